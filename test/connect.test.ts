/**
 * PROTOCOL.md section 5: the livepipe.v1.Relay service over gRPC, gRPC-Web and Connect, each
 * exercised with a real client: @grpc/grpc-js (loading proto/livepipe/v1/relay.proto with
 * @grpc/proto-loader) over cleartext HTTP/2, and ConnectRPC's Connect and gRPC-Web transports
 * over HTTP/1.1. Same sessions, ids, resume and slow-client bounds as SSE.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import { createServer as createH2cServer, type Http2Server, type Http2Session } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { Code, ConnectError, createClient, type Transport } from '@connectrpc/connect';
import { createConnectTransport, createGrpcWebTransport } from '@connectrpc/connect-node';
import { createRelay, type Relay, type RelayOptions } from '../src/index.ts';
import { Relay as RelayService, StreamErrorSchema, type Event } from '../src/gen/livepipe/v1/relay_pb.ts';
import { parseCli } from '../src/server/args.ts';
import { startServer } from '../src/server/cli.ts';
import { post, SseReader } from './support/relay.ts';
import { Waiter } from './support/wait.ts';

const PROTO = fileURLToPath(new URL('../proto/livepipe/v1/relay.proto', import.meta.url));

// ---------------------------------------------------------------------------------------------
// A relay serving the RPC handler on node:http (Connect, gRPC-Web, and the SSE endpoints) and on
// an h2c node:http2 server (gRPC).

interface RpcRelay {
  relay: Relay;
  /** http://127.0.0.1:<port> of the HTTP/1.1 server */
  base: string;
  /** 127.0.0.1:<port> of the h2c server */
  h2Address: string;
  close(): Promise<void>;
}

async function startRpcRelay(options: Partial<RelayOptions> = {}): Promise<RpcRelay> {
  const relay = await createRelay({ broker: `mem://connect-${process.pid}-${Math.random()}`, ...options });
  const rpc = relay.connectHandler();
  const h1: Server = createServer((req, res) => void rpc(req, res, () => relay.handler(req, res)));
  const h2: Http2Server = createH2cServer((req, res) => void rpc(req, res));
  const sessions = new Set<Http2Session>();
  h2.on('session', (s) => {
    sessions.add(s);
    s.once('close', () => sessions.delete(s));
  });
  await new Promise<void>((resolve) => h1.listen(0, '127.0.0.1', resolve));
  await new Promise<void>((resolve) => h2.listen(0, '127.0.0.1', resolve));
  return {
    relay,
    base: `http://127.0.0.1:${(h1.address() as AddressInfo).port}`,
    h2Address: `127.0.0.1:${(h2.address() as AddressInfo).port}`,
    async close() {
      await relay.close();
      h1.closeAllConnections();
      for (const s of sessions) s.destroy();
      await Promise.all([new Promise((resolve) => h1.close(resolve)), new Promise((resolve) => h2.close(resolve))]);
    },
  };
}

// ---------------------------------------------------------------------------------------------
// One test model of a stream and of the unary call, whatever the client library.

interface Ev {
  kind: 'config' | 'message' | 'error' | 'heartbeat';
  /** message: `<session>.<seq>` */
  id?: string;
  topic?: string;
  payload?: Buffer;
  config?: { sessionId: string; subscriptions: string[]; resumed: boolean; heartbeatMs: number; sessionTtlMs: number; id: string };
  error?: { code: string; message: string; topic: string; count: number };
}

/** How a call failed: the gRPC status code, the status message, and the livepipe code where the client can read it. */
interface CallError {
  code: number;
  message: string;
  /** From the livepipe.v1.StreamError error detail (Connect clients read details; grpc-js does not decode them). */
  detailCode?: string;
}

class OpenStream {
  readonly events: Ev[] = [];
  ended = false;
  /** Set when the call ended with an error status. */
  failure: CallError | undefined;
  private readonly waiter = new Waiter();
  pause: () => void = () => {};
  resume: () => void = () => {};
  close: () => void = () => {};

  get config(): NonNullable<Ev['config']> {
    const first = this.events[0];
    assert.equal(first?.kind, 'config', 'the first event is config');
    return first.config!;
  }

  messages(): Ev[] {
    return this.events.filter((e) => e.kind === 'message');
  }

  errors(): NonNullable<Ev['error']>[] {
    return this.events.filter((e) => e.kind === 'error').map((e) => e.error!);
  }

  push(ev: Ev): void {
    this.events.push(ev);
    this.wakeAll();
  }

  finish(failure?: CallError): void {
    this.ended = true;
    this.failure = failure;
    this.wakeAll();
  }

  until(predicate: () => boolean, what: string, ms = 10_000): Promise<void> {
    const timedOut = () => new Error(`timed out waiting for ${what}; events: ${JSON.stringify(this.events.slice(-5).map(show))}, ended ${this.ended} ${JSON.stringify(this.failure)}`);
    return this.waiter.until(predicate, ms, timedOut);
  }

  private wakeAll(): void {
    this.waiter.wake();
  }
}

function show(ev: Ev): unknown {
  return { ...ev, payload: ev.payload && ev.payload.length > 40 ? `${ev.payload.length} bytes` : ev.payload?.toString() };
}

interface StreamArgs {
  topics?: string[];
  sessionId?: string;
  lastEventId?: string;
}

interface UpdateArgs {
  sessionId: string;
  add?: string[];
  remove?: string[];
}

interface UpdateResult {
  sessionId: string;
  subscriptions: string[];
  failed: { topic: string; code: string; message: string }[];
}

interface RpcClient {
  name: string;
  /** connect's protocol name, as the relay counts connections by transport */
  protocol: string;
  stream(args: StreamArgs): OpenStream;
  update(args: UpdateArgs): Promise<UpdateResult>;
  close(): void;
}

/** @grpc/grpc-js over h2c, with the service loaded from the .proto file. */
function grpcJsClient(r: RpcRelay): RpcClient {
  const definition = protoLoader.loadSync(PROTO, { oneofs: true, longs: Number, defaults: true });
  const pkg = grpc.loadPackageDefinition(definition) as any;
  const client: any = new pkg.livepipe.v1.Relay(r.h2Address, grpc.credentials.createInsecure());
  const toError = (err: grpc.ServiceError): CallError => ({ code: err.code, message: err.details });
  return {
    name: 'grpc-js (gRPC over h2c)',
    protocol: 'grpc',
    stream(args) {
      const s = new OpenStream();
      const call: grpc.ClientReadableStream<any> = client.Stream({ topics: args.topics ?? [], sessionId: args.sessionId ?? '', lastEventId: args.lastEventId ?? '' });
      call.on('data', (e: any) => {
        const kind = e.event as Ev['kind'];
        if (kind === 'config') s.push({ kind, config: e.config });
        else if (kind === 'message') s.push({ kind, id: e.message.id, topic: e.message.topic, payload: Buffer.from(e.message.payload) });
        else if (kind === 'error') s.push({ kind, error: e.error });
        else s.push({ kind });
      });
      // 'status' comes last, after 'end' or 'error' (which must be listened to, or it throws).
      call.on('error', () => {});
      call.on('status', (status: grpc.StatusObject) => s.finish(status.code === grpc.status.OK ? undefined : { code: status.code, message: status.details }));
      s.pause = () => call.pause();
      s.resume = () => call.resume();
      s.close = () => call.cancel();
      return s;
    },
    update(args) {
      return new Promise((resolve, reject) => {
        client.UpdateSubscriptions({ sessionId: args.sessionId, add: args.add ?? [], remove: args.remove ?? [] }, (err: grpc.ServiceError | null, res: UpdateResult) => {
          if (err) reject(toError(err));
          else resolve(res);
        });
      });
    },
    close: () => client.close(),
  };
}

/** A ConnectRPC client (the one Connect-Web uses in browsers) with a node transport. */
function connectClient(name: string, protocol: string, transport: Transport): RpcClient {
  const client = createClient(RelayService, transport);
  const toError = (err: unknown): CallError => {
    const e = ConnectError.from(err);
    return { code: e.code, message: e.rawMessage, detailCode: e.findDetails(StreamErrorSchema)[0]?.code };
  };
  return {
    name,
    protocol,
    stream(args) {
      const s = new OpenStream();
      const abort = new AbortController();
      let gate: Promise<void> | undefined;
      let open: (() => void) | undefined;
      s.pause = () => {
        gate ??= new Promise((resolve) => (open = resolve));
      };
      s.resume = () => {
        open?.();
        gate = undefined;
      };
      s.close = () => abort.abort();
      void (async () => {
        try {
          for await (const e of client.stream({ topics: args.topics ?? [], sessionId: args.sessionId ?? '', lastEventId: args.lastEventId ?? '' }, { signal: abort.signal })) {
            s.push(fromConnect(e));
            // A paused reader stops pulling, so the transport stops reading its socket.
            if (gate) await gate;
          }
          s.finish();
        } catch (err) {
          s.finish(toError(err));
        }
      })();
      return s;
    },
    async update(args) {
      try {
        const res = await client.updateSubscriptions({ sessionId: args.sessionId, add: args.add ?? [], remove: args.remove ?? [] });
        return { sessionId: res.sessionId, subscriptions: res.subscriptions, failed: res.failed.map((f) => ({ topic: f.topic, code: f.code, message: f.message })) };
      } catch (err) {
        throw toError(err);
      }
    },
    close: () => {},
  };
}

function fromConnect(e: Event): Ev {
  switch (e.event.case) {
    case 'config':
      return { kind: 'config', config: { ...e.event.value } };
    case 'message':
      return { kind: 'message', id: e.event.value.id, topic: e.event.value.topic, payload: Buffer.from(e.event.value.payload) };
    case 'error':
      return { kind: 'error', error: { ...e.event.value } };
    case 'heartbeat':
      return { kind: 'heartbeat' };
    default:
      throw new Error(`unknown event ${JSON.stringify(e)}`);
  }
}

type ClientFactory = (r: RpcRelay) => RpcClient;

const CLIENTS: ClientFactory[] = [
  grpcJsClient,
  (r) => connectClient('Connect over HTTP/1.1', 'connect', createConnectTransport({ baseUrl: r.base, httpVersion: '1.1' })),
  (r) => connectClient('gRPC-Web over HTTP/1.1', 'grpc-web', createGrpcWebTransport({ baseUrl: r.base, httpVersion: '1.1' })),
];

/** Runs `body` once per client library against a fresh relay. */
async function eachClient(options: Partial<RelayOptions>, body: (client: RpcClient, r: RpcRelay) => Promise<void>): Promise<void> {
  for (const make of CLIENTS) {
    const r = await startRpcRelay(options);
    const client = make(r);
    try {
      await body(client, r).catch((err: unknown) => {
        throw new Error(`${client.name}: ${(err as Error).message}`, { cause: err });
      });
    } finally {
      client.close();
      await r.close();
    }
  }
}

async function opened(client: RpcClient, args: StreamArgs): Promise<OpenStream> {
  const s = client.stream(args);
  await s.until(() => s.events.length >= 1 || s.ended, 'the config event');
  assert.equal(s.failure, undefined, `the stream failed: ${JSON.stringify(s.failure)}`);
  return s;
}

/** Waits until the relay has noticed that every stream has gone. */
async function noConnections(relay: Relay): Promise<void> {
  const deadline = Date.now() + 5000;
  while (Object.keys(relay.stats().connections).length > 0) {
    if (Date.now() > deadline) throw new Error(`connections still open: ${JSON.stringify(relay.stats().connections)}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

function text(ev: Ev): string {
  return ev.payload!.toString('utf8');
}

// ---------------------------------------------------------------------------------------------

describe('livepipe.v1.Relay Stream', () => {
  it('sends config first, then the messages of subscribed topics, bodies byte for byte, with <session>.<seq> ids', async () => {
    await eachClient({ sessionTtlMs: 5000 }, async (client, r) => {
      const s = await opened(client, { topics: ['a', 'b'] });
      const config = s.config;
      assert.match(config.sessionId, /^[A-Za-z0-9_-]{22,}$/);
      assert.deepEqual(config.subscriptions, ['a', 'b']);
      assert.equal(config.resumed, false);
      assert.equal(config.heartbeatMs, 15_000);
      assert.equal(config.sessionTtlMs, 5000);
      assert.match(config.id, new RegExp(`^${config.sessionId}\\.\\d+$`));
      assert.deepEqual(r.relay.stats().connections, { [client.protocol]: 1 });

      const binary = Buffer.from([0xff, 0x00, 0xfe, 0x80]);
      const json = '{ "spaced":  true }';
      await r.relay.publish('a', 'hello');
      await r.relay.publish('c', 'not subscribed');
      await r.relay.publish('b', binary);
      await r.relay.publish('a', 'é ✓ 😀');
      await r.relay.publish('b', json);
      await s.until(() => s.messages().length >= 4, 'four messages');

      const got = s.messages();
      assert.deepEqual(got.map((m) => m.topic), ['a', 'b', 'a', 'b']);
      assert.equal(text(got[0]!), 'hello');
      assert.deepEqual(got[1]!.payload, binary, 'a body that is not UTF-8 arrives unchanged');
      assert.equal(text(got[2]!), 'é ✓ 😀');
      assert.equal(text(got[3]!), json, 'a JSON body arrives as the same bytes');
      const seqs = got.map((m) => {
        assert.ok(m.id!.startsWith(`${config.sessionId}.`), m.id);
        return Number(m.id!.slice(config.sessionId.length + 1));
      });
      for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i]! > seqs[i - 1]!, `ids increase: ${seqs}`);
      assert.deepEqual(s.errors(), []);
      s.close();
      await noConnections(r.relay);
    });
  });

  it('sends heartbeat events on a quiet stream, so that proxies keep it open', async () => {
    await eachClient({ heartbeatMs: 100 }, async (client, r) => {
      const s = await opened(client, { topics: ['quiet'] });
      assert.equal(s.config.heartbeatMs, 100);
      await s.until(() => s.events.filter((e) => e.kind === 'heartbeat').length >= 2, 'two heartbeats');
      s.close();
      await noConnections(r.relay);
    });
  });

  it('reports a topic whose broker subscription failed as an error event, and streams the others', async () => {
    await eachClient({}, async (client, r) => {
      const broker = r.relay.core.broker as unknown as { beginOutage(): void; endOutage(): void };
      broker.beginOutage();
      const s = await opened(client, { topics: ['down'] });
      broker.endOutage();
      await s.until(() => s.errors().length >= 1, 'the subscription-failure event');
      assert.deepEqual(s.config.subscriptions, []);
      assert.equal(s.errors()[0]!.code, 'subscription-failure');
      assert.equal(s.errors()[0]!.topic, 'down');
      s.close();
    });
  });
});

describe('livepipe.v1.Relay UpdateSubscriptions', () => {
  it('changes which topics reach the stream', async () => {
    await eachClient({}, async (client, r) => {
      const s = await opened(client, { topics: ['a'] });
      const result = await client.update({ sessionId: s.config.sessionId, add: ['b', 'c'], remove: ['a'] });
      assert.deepEqual(result, { sessionId: s.config.sessionId, subscriptions: ['b', 'c'], failed: [] });

      await r.relay.publish('a', 'removed');
      await r.relay.publish('b', 'added');
      // Messages reach a stream in publish order, so 'added' arriving means 'removed' was not sent.
      await s.until(() => s.messages().length >= 1, 'the message on b');
      await r.relay.publish('c', 'also added');
      await s.until(() => s.messages().length >= 2, 'the message on c');
      assert.deepEqual(s.messages().map((m) => [m.topic, text(m)]), [['b', 'added'], ['c', 'also added']]);
      s.close();
    });
  });

  it('works on the same sessions as SSE: an RPC update changes an SSE stream, an HTTP update changes an RPC stream', async () => {
    await eachClient({}, async (client, r) => {
      const sse = await SseReader.open(`${r.base}/events?topics=x`);
      await sse.until(() => sse.events.length >= 1, 5000, 'the SSE config');
      const sseSession: string = sse.config.session_id;
      assert.deepEqual((await client.update({ sessionId: sseSession, add: ['y'] })).subscriptions, ['x', 'y']);

      const s = await opened(client, { topics: ['p'] });
      const http = await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: s.config.sessionId, add: ['q'], remove: ['p'] }));
      assert.equal(http.status, 200);
      assert.deepEqual(http.body.subscriptions, ['q']);

      await r.relay.publish('p', 'no');
      await r.relay.publish('y', 'to sse');
      await r.relay.publish('q', 'to rpc');
      await sse.until(() => sse.messages().length >= 1, 5000, 'the SSE message');
      await s.until(() => s.messages().length >= 1, 'the RPC message');
      assert.deepEqual(sse.messages().map((m) => m.json), [{ topic: 'y', payload: 'to sse' }]);
      assert.deepEqual(s.messages().map((m) => [m.topic, text(m)]), [['q', 'to rpc']]);
      sse.close();
      s.close();
    });
  });
});

describe('resume', () => {
  it('continues a dropped stream from last_event_id with nothing lost and nothing repeated', async () => {
    await eachClient({ sessionTtlMs: 10_000 }, async (client, r) => {
      const first = await opened(client, { topics: ['t'] });
      const session = first.config.sessionId;
      for (let i = 0; i < 3; i++) await r.relay.publish('t', `m${i}`);
      await first.until(() => first.messages().length >= 3, 'the first three messages');
      const lastId = first.messages().at(-1)!.id!;
      first.close();
      await noConnections(r.relay);

      // Published while no stream is attached: held in the topic's history for the session.
      for (let i = 3; i < 6; i++) await r.relay.publish('t', `m${i}`);

      const second = await opened(client, { lastEventId: lastId });
      assert.equal(second.config.sessionId, session, 'the same session');
      assert.equal(second.config.resumed, true);
      assert.deepEqual(second.config.subscriptions, ['t']);
      await r.relay.publish('t', 'm6');
      await second.until(() => second.messages().length >= 4, 'the replayed and the live messages');
      const all = [...first.messages(), ...second.messages()];
      assert.deepEqual(all.map(text), ['m0', 'm1', 'm2', 'm3', 'm4', 'm5', 'm6']);
      assert.equal(new Set(all.map((m) => m.id)).size, 7, 'ids are unique');
      assert.deepEqual(second.errors(), []);
      second.close();
    });
  });

  it('resumes with session_id alone, and starts a new session when the old one expired', async () => {
    await eachClient({ sessionTtlMs: 200 }, async (client, r) => {
      const first = await opened(client, { topics: ['t'] });
      const session = first.config.sessionId;
      first.close();
      await noConnections(r.relay);
      const again = await opened(client, { sessionId: session, topics: ['ignored'] });
      assert.equal(again.config.sessionId, session);
      assert.equal(again.config.resumed, true);
      assert.deepEqual(again.config.subscriptions, ['t']);
      again.close();
      await noConnections(r.relay);

      await new Promise((resolve) => setTimeout(resolve, 400));
      const fresh = await opened(client, { sessionId: session, topics: ['u'] });
      assert.notEqual(fresh.config.sessionId, session);
      assert.equal(fresh.config.resumed, false);
      assert.deepEqual(fresh.config.subscriptions, ['u']);
      fresh.close();
    });
  });
});

// ---------------------------------------------------------------------------------------------

const BIG = 64 * 1024;
const OUTBOX_BYTES = 1024 * 1024;
const ROUND = 8;

/** A 64 KiB body that starts with its index. */
function bigBody(i: number): Buffer {
  const b = Buffer.alloc(BIG, 'x');
  b.write(`${i}:`);
  return b;
}

function indexOf(ev: Ev): number {
  const head = ev.payload!.subarray(0, 16).toString('latin1');
  return Number(head.slice(0, head.indexOf(':')));
}

/** Publishes messages from..to-1 in rounds; the fast reader gets each round before the next. */
async function publishRounds(relay: Relay, from: number, to: number, fast: OpenStream): Promise<void> {
  for (let i = from; i < to; i += ROUND) {
    const end = Math.min(i + ROUND, to);
    const publishes: Promise<void>[] = [];
    for (let j = i; j < end; j++) publishes.push(relay.publish('t', bigBody(j)));
    await Promise.all(publishes);
    await fast.until(() => fast.messages().length >= end, `the fast reader to get message ${end - 1}`);
  }
}

describe('a client that stops reading', () => {
  for (const [slowName, slowIndex, fastIndex] of [
    ['grpc-js (HTTP/2 flow control)', 0, 1],
    ['Connect over HTTP/1.1 (TCP backpressure)', 1, 0],
  ] as const) {
    it(`loses its own oldest messages, counted in an events-lost error event, while others get everything: ${slowName}`, { timeout: 120_000 }, async () => {
      const r = await startRpcRelay({ outbox: { maxBytes: OUTBOX_BYTES, maxMessages: 1000 }, history: { maxBytes: OUTBOX_BYTES } });
      const slowClient = CLIENTS[slowIndex]!(r);
      const fastClient = CLIENTS[fastIndex]!(r);
      try {
        const slow = await opened(slowClient, { topics: ['t'] });
        slow.pause();
        const fast = await opened(fastClient, { topics: ['t'] });

        // 20 MB in 64 KiB messages: far more than the slow reader's buffers hold.
        const total = 320;
        await publishRounds(r.relay, 0, total, fast);
        assert.deepEqual(fast.messages().map(indexOf), [...Array(total).keys()], 'the fast reader got every message, in order');
        assert.deepEqual(fast.errors(), []);
        const dropped = r.relay.stats().messagesDropped;
        assert.ok(dropped > 0, 'the slow reader fell behind by more than its outbox');

        slow.resume();
        await slow.until(() => slow.errors().length >= 1, 'events-lost');
        const later = 5;
        for (let i = total; i < total + later; i++) await r.relay.publish('t', bigBody(i));
        await slow.until(() => slow.messages().length > 0 && indexOf(slow.messages().at(-1)!) === total + later - 1, 'the later messages');

        // Every message either arrived, in order, or was counted by the events-lost before the next one.
        let next = 0;
        let counted = 0;
        for (const ev of slow.events.slice(1)) {
          if (ev.kind === 'heartbeat') continue;
          if (ev.kind === 'error') {
            assert.equal(ev.error!.code, 'events-lost');
            assert.ok(ev.error!.count > 0, JSON.stringify(ev.error));
            next += ev.error!.count;
            counted += ev.error!.count;
            continue;
          }
          assert.equal(indexOf(ev), next, 'a message missing without an events-lost that counts it');
          next++;
        }
        assert.equal(next, total + later);
        assert.equal(counted, r.relay.stats().messagesDropped, 'every drop is reported to the client that lost it');
        slow.close();
        fast.close();
      } finally {
        slowClient.close();
        fastClient.close();
        await r.close();
      }
    });
  }

  it("with outbox.onOverflow 'close' has its stream reset, and resumes from history with last_event_id", { timeout: 120_000 }, async () => {
    for (const make of [CLIENTS[0]!, CLIENTS[1]!]) {
      const r = await startRpcRelay({
        outbox: { maxBytes: OUTBOX_BYTES, maxMessages: 1000, onOverflow: 'close' },
        history: { maxBytes: 64 * 1024 * 1024, maxMessages: 10_000 },
      });
      const client = make(r);
      try {
        const slow = await opened(client, { topics: ['t'] });
        slow.pause();
        const total = 320;
        for (let i = 0; i < total; i += ROUND) {
          const batch: Promise<void>[] = [];
          for (let j = i; j < Math.min(i + ROUND, total); j++) batch.push(r.relay.publish('t', bigBody(j)));
          await Promise.all(batch);
          await new Promise((resolve) => setImmediate(resolve));
        }
        assert.ok(r.relay.stats().messagesDropped > 0, 'the reader overflowed its outbox');
        slow.resume();
        await slow.until(() => slow.ended, 'the reset stream to end');
        assert.ok(slow.failure !== undefined, `${client.name}: the stream ended with an error, not a clean end`);

        const lastId = slow.messages().at(-1)?.id ?? slow.config.id;
        const resumed = await opened(client, { lastEventId: lastId });
        assert.equal(resumed.config.resumed, true);
        await resumed.until(() => resumed.messages().length > 0 && indexOf(resumed.messages().at(-1)!) === total - 1, 'the replay up to the last message');
        const all = [...slow.messages(), ...resumed.messages()].map(indexOf);
        assert.deepEqual(all, [...Array(total).keys()], `${client.name}: nothing lost across the reset`);
        resumed.close();
      } finally {
        client.close();
        await r.close();
      }
    }
  });
});

// ---------------------------------------------------------------------------------------------

describe('errors as gRPC / Connect status codes', () => {
  async function streamFailure(client: RpcClient, args: StreamArgs): Promise<CallError> {
    const s = client.stream(args);
    await s.until(() => s.ended, 'the call to fail');
    assert.equal(s.events.length, 0, 'nothing is streamed before the error');
    assert.ok(s.failure, 'the call failed');
    return s.failure;
  }

  async function updateFailure(client: RpcClient, args: UpdateArgs): Promise<CallError> {
    try {
      await client.update(args);
    } catch (err) {
      return err as CallError;
    }
    throw new Error('the call succeeded');
  }

  function expectError(err: CallError, code: Code, livepipe: string, client: RpcClient): void {
    assert.equal(err.code, code, `status ${err.code} (${err.message}), expected ${Code[code]}`);
    assert.ok(err.message.startsWith(`${livepipe}: `), `the message names the livepipe code: ${err.message}`);
    if (client.protocol !== 'grpc') assert.equal(err.detailCode, livepipe, 'the StreamError detail carries the livepipe code');
  }

  it('InvalidArgument for invalid topics and missing fields, NotFound for an unknown session, ResourceExhausted past the caps', async () => {
    await eachClient({ maxTopicsPerSession: 2, maxBodyBytes: 4096 }, async (client, r) => {
      expectError(await streamFailure(client, { topics: ['ok', 'a,b'] }), Code.InvalidArgument, 'invalid-topic', client);
      expectError(await streamFailure(client, { topics: ['/livepipe/reserved'] }), Code.InvalidArgument, 'invalid-topic', client);
      expectError(await streamFailure(client, { topics: ['a', 'b', 'c'] }), Code.ResourceExhausted, 'too-many-topics', client);

      expectError(await updateFailure(client, { sessionId: 'no-such-session', add: ['a'] }), Code.NotFound, 'unknown-session', client);
      expectError(await updateFailure(client, { sessionId: '', add: ['a'] }), Code.InvalidArgument, 'bad-request', client);

      const s = await opened(client, { topics: ['a'] });
      const sessionId = s.config.sessionId;
      expectError(await updateFailure(client, { sessionId, add: ['b', 'bad\u0001topic'] }), Code.InvalidArgument, 'invalid-topic', client);
      expectError(await updateFailure(client, { sessionId, add: ['b', 'c'] }), Code.ResourceExhausted, 'too-many-topics', client);
      // A rejected request changes nothing.
      assert.deepEqual((await client.update({ sessionId })).subscriptions, ['a']);

      // A request larger than maxBodyBytes is refused by the RPC layer before it is parsed.
      const tooLarge = await updateFailure(client, { sessionId, add: Array.from({ length: 300 }, (_, i) => `topic-${i}`) });
      assert.equal(tooLarge.code, Code.ResourceExhausted, tooLarge.message);
      s.close();
    });
  });

  it('Unavailable when the relay is shutting down', async () => {
    await eachClient({}, async (client, r) => {
      const s = await opened(client, { topics: ['a'] });
      await r.relay.close();
      await s.until(() => s.ended, 'the open stream to end');
      assert.equal(s.failure, undefined, 'an open stream ends cleanly (OK status) so that the client reconnects');
      expectError(await streamFailure(client, { topics: ['a'] }), Code.Unavailable, 'broker-unavailable', client);
    });
  });
});

describe('browsers (CORS)', () => {
  it('answers preflight requests for the RPC paths with the headers Connect-Web and gRPC-Web send, and exposes the status headers', async () => {
    const r = await startRpcRelay({ cors: { origins: ['https://app.example'] } });
    try {
      const preflight = await fetch(`${r.base}/livepipe.v1.Relay/Stream`, {
        method: 'OPTIONS',
        headers: { origin: 'https://app.example', 'access-control-request-method': 'POST', 'access-control-request-headers': 'content-type,connect-protocol-version' },
      });
      assert.equal(preflight.status, 204);
      assert.equal(preflight.headers.get('access-control-allow-origin'), 'https://app.example');
      const allowed = preflight.headers.get('access-control-allow-headers')!.toLowerCase().split(/,\s*/);
      for (const h of ['content-type', 'connect-protocol-version', 'x-grpc-web', 'connect-timeout-ms']) assert.ok(allowed.includes(h), `${h} in ${allowed}`);

      const call = await fetch(`${r.base}/livepipe.v1.Relay/UpdateSubscriptions`, {
        method: 'POST',
        headers: { origin: 'https://app.example', 'content-type': 'application/json', 'connect-protocol-version': '1' },
        body: JSON.stringify({ sessionId: 'nope' }),
      });
      assert.equal(call.status, 404, 'Connect maps NotFound to HTTP 404');
      assert.equal(call.headers.get('access-control-allow-origin'), 'https://app.example');
      assert.ok(call.headers.get('access-control-expose-headers')!.toLowerCase().includes('grpc-status'));
      const body = (await call.json()) as { code: string; message: string };
      assert.equal(body.code, 'not_found');
      assert.match(body.message, /^unknown-session: /);

      const other = await fetch(`${r.base}/livepipe.v1.Relay/Stream`, { method: 'OPTIONS', headers: { origin: 'https://evil.example', 'access-control-request-method': 'POST' } });
      assert.equal(other.headers.get('access-control-allow-origin'), null, 'other origins are not allowed');
    } finally {
      await r.close();
    }
  });
});

describe('loading', () => {
  it('loads ConnectRPC and protobuf code only when an RPC request arrives, not for SSE', async () => {
    // A fresh process, so that nothing this test file imported counts.
    const script = `
      import { registerHooks } from 'node:module';
      import { createServer } from 'node:http';
      const heavy = [];
      registerHooks({ resolve(specifier, context, next) { if (/^@(connectrpc|bufbuild)\\//.test(specifier)) heavy.push(specifier); return next(specifier, context); } });
      const { createRelay } = await import(${JSON.stringify(new URL('../src/index.ts', import.meta.url).href)});
      const relay = await createRelay({ broker: 'mem://lazy' });
      const rpc = relay.connectHandler();
      const server = createServer((req, res) => void rpc(req, res, () => relay.handler(req, res)));
      await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
      const base = 'http://127.0.0.1:' + server.address().port;
      const sse = await fetch(base + '/events?topics=a');
      const reader = sse.body.getReader();
      await reader.read();
      const afterSse = heavy.length;
      await fetch(base + '/livepipe.v1.Relay/UpdateSubscriptions', { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"sessionId":"x"}' });
      console.log(JSON.stringify({ afterSse, afterRpc: heavy.length }));
      await reader.cancel();
      await relay.close();
      server.closeAllConnections();
      server.close();
    `;
    const { execFile } = await import('node:child_process');
    const stdout = await new Promise<string>((resolve, reject) => {
      const env = { ...process.env };
      delete env.NODE_TEST_CONTEXT;
      execFile(process.execPath, ['--input-type=module', '-e', script], { env, timeout: 20_000 }, (err, out, errOut) => (err ? reject(new Error(`${err.message}\n${errOut}`)) : resolve(out)));
    });
    const counts = JSON.parse(stdout.trim().split('\n').at(-1)!) as { afterSse: number; afterRpc: number };
    assert.equal(counts.afterSse, 0, 'serving SSE loaded no @connectrpc or @bufbuild module');
    assert.ok(counts.afterRpc > 0, 'the first RPC request loaded them');
  });
});

describe('the livepipe command (startServer)', () => {
  it('parses --grpc-port', () => {
    assert.deepEqual(parseCli(['--grpc-port', '50051'], {}), { kind: 'serve', config: { host: '127.0.0.1', port: 8080, broker: 'mem://', grpcPort: 50051 } });
    assert.throws(() => parseCli(['--grpc-port', 'x'], {}), /--grpc-port: "x" is not a port number/);
  });

  it('serves Connect and gRPC-Web on the main port, gRPC on --grpc-port, and ends their streams cleanly on shutdown', async () => {
    const running = await startServer({ host: '127.0.0.1', port: 0, broker: `mem://cli-${process.pid}-${Math.random()}`, grpcPort: 0 });
    const r: RpcRelay = { relay: running.relay, base: running.url, h2Address: running.grpcUrl!.replace('http://', ''), close: running.shutdown };
    const clients = CLIENTS.map((make) => make(r));
    try {
      const streams = await Promise.all(clients.map((c) => opened(c, { topics: ['news'] })));
      await running.relay.publish('news', 'hi');
      for (const s of streams) await s.until(() => s.messages().length === 1, 'the message');
      // The RPC paths do not shadow the relay's own endpoints on the main port.
      assert.equal((await fetch(`${running.url}/healthz`)).status, 200);
      await running.shutdown();
      for (const s of streams) {
        await s.until(() => s.ended, 'the stream to end');
        assert.equal(s.failure, undefined, 'ended with an OK status');
      }
    } finally {
      for (const c of clients) c.close();
      await running.shutdown();
    }
  });
});
