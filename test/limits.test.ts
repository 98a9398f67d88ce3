/**
 * The `limits` option: streams per client address (SSE, WebSocket and RPC together), live
 * sessions, token buckets on subscription updates (per session) and publishes (per address),
 * X-Forwarded-For only behind a trusted proxy, Retry-After, and memory that does not grow. A
 * second client address is 127.0.0.2 (the whole of 127/8 is loopback on Linux).
 */
import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, request, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { WebSocket } from 'ws';
import { Hono } from 'hono';
import { mount } from 'hono/mount';
import { serve } from '@hono/node-server';
import { Code, ConnectError, createClient } from '@connectrpc/connect';
import { createConnectTransport } from '@connectrpc/connect-node';
import { createRelay, type RelayOptions } from '../src/index.ts';
import { Relay as RelayService } from '../src/gen/livepipe/v1/relay_pb.ts';
import { Limits } from '../src/limits.ts';
import type { LimitOptions } from '../src/options.ts';
import { SseReader, startRelay, type RunningRelay } from './support/relay.ts';

const OTHER = '127.0.0.2';

/** A relay whose server also takes WebSocket upgrades; closed when the test ends. */
async function start(t: TestContext, limits: LimitOptions, options: Partial<RelayOptions> = {}): Promise<RunningRelay & { ws: string }> {
  const r = await startRelay({ ...options, limits });
  r.server.on('upgrade', (req, socket, head) => {
    if (!r.relay.handleUpgrade(req, socket, head)) socket.destroy();
  });
  t.after(() => r.close());
  return { ...r, ws: `${r.base.replace('http:', 'ws:')}/ws` };
}

/** A clock the test moves by hand, so that buckets refill without sleeping. */
function manualClock(r: RunningRelay): { advance(ms: number): void } {
  let now = 0;
  r.relay.core.limits.now = () => now;
  return {
    advance(ms) {
      now += ms;
    },
  };
}

interface Stream {
  status: number;
  headers: IncomingHttpHeaders;
  /** The error body of a refused stream. */
  body: any;
  /** The config payload of an open one. */
  config: any;
  close(): void;
}

/** Opens GET /events from `from` (a local address); resolves with the config event, or with the error answer. */
function openSse(base: string, query: string, options: { from?: string; headers?: Record<string, string> } = {}): Promise<Stream> {
  return new Promise((resolve, reject) => {
    const req = request(`${base}/events?${query}`, { localAddress: options.from, headers: { accept: 'text/event-stream', ...options.headers } }, (res) => {
      const stream: Stream = { status: res.statusCode!, headers: res.headers, body: undefined, config: undefined, close: () => req.destroy() };
      let text = '';
      res.setEncoding('utf8');
      res.on('error', () => {});
      res.on('data', (chunk: string) => {
        text += chunk;
        const config = /^data: (.*)$/m.exec(text);
        if (res.statusCode === 200 && config && stream.config === undefined) {
          stream.config = JSON.parse(config[1]!).payload;
          resolve(stream);
        }
      });
      res.on('end', () => {
        if (res.statusCode === 200) return reject(new Error(`the stream ended before its config event: ${text}`));
        stream.body = JSON.parse(text);
        resolve(stream);
      });
    });
    req.on('error', reject);
    req.end();
  });
}

/** An HTTP request from `from`; the JSON body parsed. */
function send(url: string, options: { method?: string; body?: string; from?: string; headers?: Record<string, string> } = {}): Promise<{ status: number; headers: IncomingHttpHeaders; body: any }> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method: options.method ?? 'POST', localAddress: options.from, headers: { 'content-type': 'application/json', ...options.headers } }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (text += chunk));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: text ? JSON.parse(text) : undefined }));
    });
    req.on('error', reject);
    req.end(options.body ?? '');
  });
}

function update(r: RunningRelay, sessionId: string, add: string[], from?: string) {
  return send(`${r.base}/update_subscriptions`, { body: JSON.stringify({ session_id: sessionId, add }), from });
}

/** A WebSocket client that keeps its frames and how it closed. */
class WsClient {
  readonly frames: any[] = [];
  closed: { code: number; reason: string } | undefined;
  readonly socket: WebSocket;
  private waiters: Array<() => void> = [];

  constructor(url: string, from?: string) {
    this.socket = new WebSocket(url, { localAddress: from });
    this.socket.on('message', (data) => {
      this.frames.push(JSON.parse(data.toString()));
      this.wake();
    });
    this.socket.on('close', (code, reason) => {
      this.closed = { code, reason: reason.toString() };
      this.wake();
    });
    this.socket.on('error', () => {});
  }

  static async open(url: string, from?: string): Promise<WsClient> {
    const client = new WsClient(url, from);
    await client.until(() => client.frames.length > 0 || client.closed !== undefined);
    return client;
  }

  /** Sends a frame and waits for its answer. */
  async request(frame: Record<string, unknown>, ref: number): Promise<any> {
    this.socket.send(JSON.stringify({ ...frame, ref }));
    await this.until(() => this.frames.some((f) => f.ref === ref));
    return this.frames.find((f) => f.ref === ref);
  }

  until(predicate: () => boolean): Promise<void> {
    return waitFor(predicate, (wake) => this.waiters.push(wake));
  }

  close(): void {
    this.socket.terminate();
  }

  private wake(): void {
    for (const wake of this.waiters.splice(0)) wake();
  }
}

/** Waits until `predicate` holds: woken by `subscribe` where given, else polled. */
async function waitFor(predicate: () => boolean, subscribe?: (wake: () => void) => void, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${predicate.toString()}`);
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, 20);
      subscribe?.(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }
}

function assertRefused(answer: { status: number; body: any }, code: string, message: RegExp): void {
  assert.equal(answer.status, 429, JSON.stringify(answer.body));
  assert.equal(answer.body.error.code, code);
  assert.match(answer.body.error.message, message);
}

describe('maxConnectionsPerIp', () => {
  it('refuses the N+1th SSE stream from one address with 429 while another address connects, and frees the slot on close', async (t) => {
    const r = await start(t, { maxConnectionsPerIp: 2 });
    const limits = r.relay.core.limits;
    const a = await openSse(r.base, 'topics=t');
    const b = await openSse(r.base, 'topics=t');
    assert.equal(limits.connectionsFrom('127.0.0.1'), 2);

    const refused = await openSse(r.base, 'topics=t');
    assertRefused(refused, 'rate-limited', /too many open streams from 127\.0\.0\.1: at most 2 per client address/);
    assert.equal(refused.headers['retry-after'], undefined, 'when a stream closes is not known');
    assert.equal(r.relay.stats().sessions, 2, 'a refused stream creates no session');

    const other = await openSse(r.base, 'topics=t', { from: OTHER });
    assert.equal(other.status, 200);
    assert.equal(limits.connectionsFrom(OTHER), 1);

    a.close();
    await waitFor(() => limits.connectionsFrom('127.0.0.1') === 1);
    const again = await openSse(r.base, 'topics=t');
    assert.equal(again.status, 200);

    const metrics = await r.relay.metrics.metrics();
    assert.match(metrics, /^livepipe_rejected_total\{reason="connections_per_ip"\} 1$/m);
    assert.match(metrics, /^livepipe_rejected_total\{reason="sessions"\} 0$/m);
    for (const s of [b, other, again]) s.close();
    await waitFor(() => limits.tracked.addresses === 0);
  });

  it('lets a session resume from the same address at the cap: the new stream takes over the old one’s slot', async (t) => {
    const r = await start(t, { maxConnectionsPerIp: 1 });
    const first = await openSse(r.base, 'topics=t');
    // The old connection is still open (say, half-dead after a network change) when the client comes back.
    const resumed = await openSse(r.base, `session_id=${first.config.session_id}`);
    assert.equal(resumed.status, 200);
    assert.equal(resumed.config.resumed, true);
    assert.equal(r.relay.core.limits.connectionsFrom('127.0.0.1'), 1);
    // A different session from that address is still one too many.
    assertRefused(await openSse(r.base, 'topics=t'), 'rate-limited', /too many open streams/);
    first.close();
    resumed.close();
  });

  it('counts WebSocket and SSE streams together; a refused WebSocket gets the error frame and close code 1013', async (t) => {
    const r = await start(t, { maxConnectionsPerIp: 2 });
    const limits = r.relay.core.limits;
    const sse = await openSse(r.base, 'topics=t');
    const ws = await WsClient.open(`${r.ws}?topics=t`);
    assert.equal(ws.frames[0].payload.resumed, false);
    assert.equal(limits.connectionsFrom('127.0.0.1'), 2);

    const refused = await WsClient.open(`${r.ws}?topics=t`);
    await refused.until(() => refused.closed !== undefined);
    assert.equal(refused.frames[0].error.code, 'rate-limited');
    assert.match(refused.frames[0].error.message, /too many open streams from 127\.0\.0\.1/);
    // 1013 Try Again Later: the livepipe client backs off and retries (it gives up on 1008).
    assert.deepEqual(refused.closed, { code: 1013, reason: 'rate-limited' });
    assert.equal(r.relay.stats().sessions, 2);

    const other = await WsClient.open(`${r.ws}?topics=t`, OTHER);
    assert.equal(other.frames[0].payload.resumed, false);

    ws.close();
    await waitFor(() => limits.connectionsFrom('127.0.0.1') === 1);
    const again = await WsClient.open(`${r.ws}?topics=t`);
    assert.equal(again.frames[0].payload.resumed, false);
    for (const c of [other, again]) c.close();
    sse.close();
  });

  it('counts RPC streams too: over the cap a Stream call fails with resource-exhausted', async (t) => {
    const relay = await createRelay({ broker: `mem://limits-rpc-${process.pid}-${Math.random()}`, limits: { maxConnectionsPerIp: 1 } });
    const rpc = relay.connectHandler();
    const server = createServer((req, res) => void rpc(req, res, () => relay.handler(req, res)));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    t.after(async () => {
      await relay.close();
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    });
    const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    const client = createClient(RelayService, createConnectTransport({ baseUrl: base, httpVersion: '1.1' }));

    const sse = await openSse(base, 'topics=t');
    const refused = client.stream({ topics: ['t'] })[Symbol.asyncIterator]().next();
    await assert.rejects(refused, (err: unknown) => {
      const e = ConnectError.from(err);
      assert.equal(e.code, Code.ResourceExhausted);
      assert.match(e.rawMessage, /^rate-limited: too many open streams/);
      return true;
    });

    sse.close();
    await waitFor(() => relay.core.limits.connectionsFrom('127.0.0.1') === 0);
    const abort = new AbortController();
    const first = await client.stream({ topics: ['t'] }, { signal: abort.signal })[Symbol.asyncIterator]().next();
    assert.equal(first.value?.event.case, 'config');
    abort.abort();
    await waitFor(() => relay.core.limits.connectionsFrom('127.0.0.1') === 0);
  });
});

describe('maxSessions', () => {
  it('refuses a new session when the relay is full, still resumes existing ones, and takes new ones once some expire', async (t) => {
    const r = await start(t, { maxSessions: 2 }, { sessionTtlMs: 300 });
    const a = await openSse(r.base, 'topics=t');
    const b = await openSse(r.base, 'topics=t');

    assertRefused(await openSse(r.base, 'topics=t', { from: OTHER }), 'rate-limited', /the relay is full: it holds its maximum of 2 sessions/);
    const ws = await WsClient.open(`${r.ws}?topics=t`);
    await ws.until(() => ws.closed !== undefined);
    assert.equal(ws.frames[0].error.code, 'rate-limited');
    assert.equal(ws.closed!.code, 1013);
    assert.equal(r.relay.stats().sessions, 2);

    // Resuming creates no session: never refused by this cap.
    a.close();
    const resumed = await openSse(r.base, `session_id=${a.config.session_id}`);
    assert.equal(resumed.config.resumed, true);
    assert.equal(resumed.config.session_id, a.config.session_id);

    b.close();
    await waitFor(() => r.relay.stats().sessions === 1);
    const c = await openSse(r.base, 'topics=t');
    assert.equal(c.status, 200);
    assert.equal(c.config.resumed, false);
    assert.match(await r.relay.metrics.metrics(), /^livepipe_rejected_total\{reason="sessions"\} 2$/m);
    resumed.close();
    c.close();
  });
});

describe('updateRate', () => {
  it('allows a burst, then 429 rate-limited with Retry-After until the bucket refills; a refused update changes nothing', async (t) => {
    const r = await start(t, { updateRate: { perSecond: 0.5, burst: 2 } });
    const clock = manualClock(r);
    const s = await openSse(r.base, '');
    const sid = s.config.session_id;

    assert.equal((await update(r, sid, ['a'])).status, 200);
    assert.equal((await update(r, sid, ['b'])).status, 200);
    const refused = await update(r, sid, ['c']);
    assertRefused(refused, 'rate-limited', /too many subscription updates for this session: at most 2 at once and 0\.5 per second; retry in 2 s/);
    assert.equal(refused.headers['retry-after'], '2');

    // Half a token after a second: still refused, and sooner.
    clock.advance(1000);
    const early = await update(r, sid, ['c']);
    assert.equal(early.status, 429);
    assert.equal(early.headers['retry-after'], '1');

    clock.advance(1000);
    const ok = await update(r, sid, ['c']);
    assert.equal(ok.status, 200);
    assert.deepEqual(ok.body.subscriptions, ['a', 'b', 'c'], 'the refused requests added nothing');
    assert.equal((await update(r, sid, ['d'])).status, 429);

    // Per session: another session has its own bucket.
    const other = await openSse(r.base, '');
    assert.equal((await update(r, other.config.session_id, ['a'])).status, 200);
    s.close();
    other.close();
  });

  it('limits WebSocket subscribe frames too, in the same bucket as the session’s HTTP updates', async (t) => {
    const r = await start(t, { updateRate: { perSecond: 1, burst: 1 } });
    const clock = manualClock(r);
    const ws = await WsClient.open(`${r.ws}?topics=t`);
    const sid = ws.frames[0].payload.session_id;

    assert.deepEqual((await ws.request({ type: 'subscribe', topics: ['x'] }, 1)).subscriptions, ['t', 'x']);
    const refused = await ws.request({ type: 'subscribe', topics: ['y'] }, 2);
    assert.equal(refused.error.code, 'rate-limited');
    assert.match(refused.error.message, /retry in 1 s/);
    assert.equal(ws.closed, undefined, 'a refused frame leaves the stream open');

    clock.advance(1000);
    assert.equal((await update(r, sid, ['y'])).status, 200);
    const again = await ws.request({ type: 'subscribe', topics: ['z'] }, 3);
    assert.equal(again.error.code, 'rate-limited');
    clock.advance(1000);
    assert.deepEqual((await ws.request({ type: 'subscribe', topics: ['z'] }, 4)).subscriptions, ['t', 'x', 'y', 'z']);
    ws.close();
  });
});

describe('publishRate', () => {
  it('limits POST /publish per client address, with Retry-After; a refused publish publishes nothing', async (t) => {
    const r = await start(t, { publishRate: { perSecond: 1, burst: 2 } }, { cors: { origins: ['https://app.example'] } });
    const clock = manualClock(r);
    const reader = await SseReader.open(`${r.base}/events?topics=news`);
    const publish = (body: string, from?: string) => send(`${r.base}/publish?topic=news`, { body, from, headers: { 'content-type': 'text/plain', origin: 'https://app.example' } });

    assert.equal((await publish('1')).status, 204);
    assert.equal((await publish('2')).status, 204);
    const refused = await publish('refused');
    assertRefused(refused, 'rate-limited', /too many publishes from 127\.0\.0\.1: at most 2 at once and 1 per second; retry in 1 s/);
    assert.equal(refused.headers['retry-after'], '1');
    // A page on an allowed origin can read it.
    assert.equal(refused.headers['access-control-allow-origin'], 'https://app.example');
    assert.match(String(refused.headers['access-control-expose-headers']), /retry-after/i);

    assert.equal((await publish('3', OTHER)).status, 204, 'another address has its own bucket');
    clock.advance(1000);
    assert.equal((await publish('4')).status, 204);

    await reader.until(() => reader.messages().length === 4);
    assert.deepEqual(reader.messages().map((m) => m.json.payload), ['1', '2', '3', '4']);
    assert.match(await r.relay.metrics.metrics(), /^livepipe_rejected_total\{reason="publish_rate"\} 1$/m);
    reader.close();
  });
});

describe('trustProxy', () => {
  it('when on, counts by the first X-Forwarded-For entry', async (t) => {
    const r = await start(t, { maxConnectionsPerIp: 1, trustProxy: true });
    const a = await openSse(r.base, 'topics=t', { headers: { 'x-forwarded-for': '203.0.113.5, 10.0.0.1' } });
    assert.equal(a.status, 200);
    assertRefused(await openSse(r.base, 'topics=t', { headers: { 'x-forwarded-for': '203.0.113.5' } }), 'rate-limited', /from 203\.0\.113\.5/);
    const b = await openSse(r.base, 'topics=t', { headers: { 'x-forwarded-for': '203.0.113.6' } });
    assert.equal(b.status, 200);
    // No header: the socket's address.
    const c = await openSse(r.base, 'topics=t');
    assert.equal(c.status, 200);
    assert.equal(r.relay.core.limits.connectionsFrom('127.0.0.1'), 1);
    for (const s of [a, b, c]) s.close();
  });

  it('when off, ignores X-Forwarded-For: a client cannot dodge the cap by sending one', async (t) => {
    const r = await start(t, { maxConnectionsPerIp: 1 });
    const a = await openSse(r.base, 'topics=t', { headers: { 'x-forwarded-for': '203.0.113.5' } });
    assert.equal(a.status, 200);
    assertRefused(await openSse(r.base, 'topics=t', { headers: { 'x-forwarded-for': '203.0.113.6' } }), 'rate-limited', /from 127\.0\.0\.1/);
    a.close();
  });

  it('parses the address forms proxies send, and falls back to the socket for anything else', () => {
    const trusting = new Limits({ trustProxy: true });
    assert.equal(trusting.clientAddress('10.0.0.1', '198.51.100.7, 10.0.0.1'), '198.51.100.7');
    assert.equal(trusting.clientAddress('10.0.0.1', ['198.51.100.7', '10.0.0.2']), '198.51.100.7');
    assert.equal(trusting.clientAddress('10.0.0.1', '198.51.100.7:5555'), '198.51.100.7');
    assert.equal(trusting.clientAddress('10.0.0.1', '[2001:DB8::1]:443'), '2001:db8::1');
    assert.equal(trusting.clientAddress('10.0.0.1', 'unknown'), '10.0.0.1');
    assert.equal(trusting.clientAddress('10.0.0.1', ''), '10.0.0.1');
    assert.equal(trusting.clientAddress('::ffff:10.0.0.1', undefined), '10.0.0.1', 'IPv4-mapped IPv6 is the IPv4 address');
    const direct = new Limits({});
    assert.equal(direct.clientAddress('10.0.0.1', '198.51.100.7'), '10.0.0.1');
    assert.equal(direct.clientAddress(undefined, '198.51.100.7'), undefined);
  });
});

describe('the fetch handler', () => {
  it('applies the per-address cap with a client address passed to it, and not without one', async (t) => {
    const relay = await createRelay({ broker: `mem://limits-fetch-${process.pid}-${Math.random()}`, limits: { maxConnectionsPerIp: 1 } });
    const bodies: Array<ReadableStream | null> = [];
    t.after(async () => {
      for (const body of bodies) await body?.cancel().catch(() => {});
      await relay.close();
    });
    const open = async (client?: object) => {
      const res = await relay.fetch(new Request('http://relay/events?topics=t'), client);
      bodies.push(res.body);
      return res;
    };

    const first = await open({ clientAddress: '198.51.100.1' });
    assert.equal(first.status, 200);
    const refused = await open({ clientAddress: '198.51.100.1' });
    assert.equal(refused.status, 429);
    assert.equal(((await refused.json()) as any).error.code, 'rate-limited');
    // @hono/node-server's bindings carry the socket.
    assert.equal((await open({ incoming: { socket: { remoteAddress: '198.51.100.1' } } })).status, 429);
    assert.equal((await open({ clientAddress: '198.51.100.2' })).status, 200);
    // Unknown address (no argument, trustProxy off): the per-address cap does not apply.
    assert.equal((await open()).status, 200);
    assert.equal((await open()).status, 200);

    await first.body!.cancel();
    await waitFor(() => relay.core.limits.connectionsFrom('198.51.100.1') === 0);
    assert.equal((await open({ clientAddress: '198.51.100.1' })).status, 200);
  });

  it('knows the address under Hono on @hono/node-server: mount(relay.fetch) passes the node request along', async (t) => {
    const relay = await createRelay({ broker: `mem://limits-hono-${process.pid}-${Math.random()}`, limits: { maxConnectionsPerIp: 1 } });
    const app = new Hono();
    app.all('/live/*', mount(relay.fetch));
    const server = serve({ fetch: app.fetch, port: 0, hostname: '127.0.0.1' });
    await new Promise<void>((resolve) => server.once('listening', resolve));
    t.after(async () => {
      await relay.close();
      (server as Server).closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    });
    const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}/live`;
    const a = await openSse(base, 'topics=t');
    assert.equal(a.status, 200);
    assertRefused(await openSse(base, 'topics=t'), 'rate-limited', /too many open streams from 127\.0\.0\.1/);
    const b = await openSse(base, 'topics=t', { from: OTHER });
    assert.equal(b.status, 200);
    a.close();
    b.close();
  });

  it('puts Retry-After on a rate-limited publish', async (t) => {
    const relay = await createRelay({ broker: `mem://limits-fetch-${process.pid}-${Math.random()}`, publish: true, limits: { publishRate: { perSecond: 1, burst: 1 } } });
    t.after(() => relay.close());
    const publish = () => relay.fetch(new Request('http://relay/publish?topic=t', { method: 'POST', body: 'x' }), { clientAddress: '198.51.100.1' });
    assert.equal((await publish()).status, 204);
    const refused = await publish();
    assert.equal(refused.status, 429);
    assert.equal(refused.headers.get('retry-after'), '1');
  });
});

describe('memory', () => {
  it('drops a bucket once it has refilled (never before), through the relay’s sweeper', async (t) => {
    const r = await start(t, { updateRate: { perSecond: 1, burst: 2 }, publishRate: { perSecond: 1, burst: 2 } }, { heartbeatMs: 100 });
    const clock = manualClock(r);
    const limits = r.relay.core.limits;
    const s = await openSse(r.base, '');
    assert.equal((await update(r, s.config.session_id, ['a'])).status, 200);
    assert.equal((await send(`${r.base}/publish?topic=a`, { body: 'x', headers: { 'content-type': 'text/plain' } })).status, 204);
    assert.deepEqual(limits.tracked, { addresses: 0, updateBuckets: 1, publishBuckets: 1 });

    // Half refilled: dropping it now would hand out a fresh burst.
    clock.advance(500);
    limits.sweep();
    assert.deepEqual(limits.tracked, { addresses: 0, updateBuckets: 1, publishBuckets: 1 });

    clock.advance(500);
    await waitFor(() => limits.tracked.updateBuckets === 0 && limits.tracked.publishBuckets === 0);
    s.close();
  });

  it('holds at most 100 000 buckets per kind, dropping the least recently used', () => {
    const limits = new Limits({ publishRate: { perSecond: 1, burst: 1 } });
    limits.now = () => 0;
    limits.takePublish('abuser');
    for (let i = 0; i < 99_999; i++) limits.takePublish(`a${i}`);
    // The abuser keeps trying: its bucket is the most recently used now.
    assert.throws(() => limits.takePublish('abuser'), { code: 'rate-limited' });
    limits.takePublish('one-more');
    assert.equal(limits.tracked.publishBuckets, 100_000);
    assert.throws(() => limits.takePublish('abuser'), { code: 'rate-limited' }, 'an active bucket is not the one dropped');
    assert.doesNotThrow(() => limits.takePublish('a0'), 'the least recently used was dropped');
  });
});

describe('options', () => {
  it('rejects unusable limits before anything opens, naming the key', async () => {
    const broker = `mem://limits-options-${process.pid}`;
    await assert.rejects(createRelay({ broker, limits: { maxConnectionsPerIp: 0 } }), /limits\.maxConnectionsPerIp must be a whole number of at least 1/);
    await assert.rejects(createRelay({ broker, limits: { updateRate: { perSecond: 0, burst: 5 } } }), /limits\.updateRate\.perSecond must be a number above 0/);
    await assert.rejects(createRelay({ broker, limits: { publishRate: { perSecond: 1, burst: 0.5 } } }), /limits\.publishRate\.burst must be a whole number/);
  });
});
