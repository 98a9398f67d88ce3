/**
 * PROTOCOL.md section 5: WebSocket at /ws, with the `ws` client library. Same sessions, ids,
 * resume and slow-client bounds as SSE; subscribe / unsubscribe frames answered on the socket.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { Duplex } from 'node:stream';
import { WebSocket } from 'ws';
import { ensureBuilt, LivepipeProcess } from './support/livepipe.ts';
import { startRelay, type RunningRelay } from './support/relay.ts';
import { Waiter } from './support/wait.ts';
import type { RelayOptions } from '../src/index.ts';

/** A relay whose server also takes WebSocket upgrades, as the CLI's does; records the server side of each `who=` socket. */
async function startWsRelay(options: Partial<RelayOptions> = {}): Promise<RunningRelay & { ws: string; sockets: Map<string, Duplex> }> {
  const r = await startRelay(options);
  const sockets = new Map<string, Duplex>();
  r.server.on('upgrade', (req, socket, head) => {
    const who = new URL(req.url ?? '/', 'http://x').searchParams.get('who');
    if (who !== null) sockets.set(who, socket);
    if (!r.relay.handleUpgrade(req, socket, head)) socket.destroy();
  });
  return { ...r, ws: `${r.base.replace('http:', 'ws:')}/ws`, sockets };
}

/** A `ws` client that keeps every frame it gets, parsed. */
class WsClient {
  readonly frames: any[] = [];
  readonly socket: WebSocket;
  closed: { code: number; reason: string } | undefined;
  pings = 0;
  private readonly waiter = new Waiter();

  private constructor(socket: WebSocket) {
    this.socket = socket;
    socket.on('message', (data) => {
      this.frames.push(JSON.parse(data.toString()));
      this.waiter.wake();
    });
    socket.on('ping', () => {
      this.pings++;
      this.waiter.wake();
    });
    socket.on('close', (code, reason) => {
      this.closed = { code, reason: reason.toString() };
      this.waiter.wake();
    });
    socket.on('error', () => {});
  }

  /** Connects and waits for the config frame. */
  static async open(url: string, options: WebSocket.ClientOptions = {}): Promise<WsClient> {
    const client = new WsClient(new WebSocket(url, options));
    await client.until(() => client.frames.length >= 1 || client.closed !== undefined, 'the config frame');
    return client;
  }

  get config(): any {
    return this.frames[0]?.payload;
  }

  messages(): any[] {
    return this.frames.filter((f) => typeof f.topic === 'string' && f.topic !== '/httpsub/config');
  }

  errors(): any[] {
    return this.frames.filter((f) => f.error !== undefined).map((f) => f.error);
  }

  /** Sends a frame and waits for its answer (matched by `ref`). */
  async request(frame: Record<string, unknown>, ref: number | string): Promise<any> {
    this.socket.send(JSON.stringify({ ...frame, ref }));
    await this.until(() => this.frames.some((f) => f.ref === ref), `the answer to ref ${ref}`);
    return this.frames.find((f) => f.ref === ref);
  }

  until(predicate: () => boolean, what: string, ms = 5000): Promise<void> {
    return this.waiter.until(predicate, ms, () => new Error(`timed out waiting for ${what}; frames so far: ${JSON.stringify(this.frames).slice(-1500)}`));
  }

  close(): void {
    this.socket.terminate();
  }
}

function seqOf(id: string): number {
  return Number(id.slice(id.lastIndexOf('.') + 1));
}

describe('WebSocket /ws', () => {
  it('sends the config frame first, then each message as {"id","topic","payload"}', async () => {
    const r = await startWsRelay({ heartbeatMs: 60_000, sessionTtlMs: 30_000 });
    try {
      const c = await WsClient.open(`${r.ws}?topics=a,b`);
      const config = c.frames[0];
      assert.equal(config.topic, '/httpsub/config');
      assert.match(config.payload.session_id, /^[\w-]{22}$/);
      assert.deepEqual(config.payload, { session_id: config.payload.session_id, subscriptions: ['a', 'b'], resumed: false, heartbeat_ms: 60_000, session_ttl_ms: 30_000 });
      assert.match(config.id, new RegExp(`^${config.payload.session_id}\\.\\d+$`));

      await r.relay.publish('a', 'héllo "quoted"');
      await r.relay.publish('b', Buffer.from([0xff, 0xfe, 0x00]));
      await r.relay.publish('b', 'x'.repeat(10_000)); // a large one leaves as two fragments
      await r.relay.publish('other', 'not subscribed');
      await r.relay.publish('a', 'last');
      await c.until(() => c.messages().length >= 4, 'four messages');
      const [m1, m2, m3, m4] = c.messages();
      const sid = config.payload.session_id;
      assert.deepEqual(Object.keys(m1), ['id', 'topic', 'payload']);
      assert.deepEqual({ ...m1, id: undefined }, { id: undefined, topic: 'a', payload: 'héllo "quoted"' });
      assert.deepEqual({ ...m2, id: undefined }, { id: undefined, topic: 'b', payload_base64: Buffer.from([0xff, 0xfe, 0x00]).toString('base64') });
      assert.equal(m3.payload, 'x'.repeat(10_000));
      assert.equal(m4.payload, 'last');
      for (const m of [m1, m2, m3, m4]) assert.ok(m.id.startsWith(`${sid}.`), m.id);
      const seqs = [m1, m2, m3, m4].map((m) => seqOf(m.id));
      assert.deepEqual([...seqs].sort((x, y) => x - y), seqs, 'ids grow');
      assert.equal(new Set(seqs).size, 4);
      assert.equal(r.relay.stats().connections.ws, 1);
      c.close();
    } finally {
      await r.close();
    }
  });

  it('answers subscribe and unsubscribe frames with the session topics, echoing ref, and follows them', async () => {
    const r = await startWsRelay();
    try {
      const c = await WsClient.open(`${r.ws}?topics=a`);
      const added = await c.request({ type: 'subscribe', topics: ['b', 'c', 'a'] }, 1);
      assert.deepEqual(added, { type: 'subscriptions', subscriptions: ['a', 'b', 'c'], failed: [], ref: 1 });
      await r.relay.publish('c', 'on c');
      await c.until(() => c.messages().length === 1, 'the message on c');

      const removed = await c.request({ type: 'unsubscribe', topics: ['a', 'c', 'never-held'] }, 'two');
      assert.deepEqual(removed, { type: 'subscriptions', subscriptions: ['b'], failed: [], ref: 'two' });
      await r.relay.publish('a', 'not delivered');
      await r.relay.publish('c', 'not delivered');
      await r.relay.publish('b', 'on b');
      await c.until(() => c.messages().length === 2, 'the message on b');
      assert.deepEqual(c.messages().map((m) => m.payload), ['on c', 'on b']);

      // Without a ref the answer has none; the same session is visible over HTTP too.
      c.socket.send(JSON.stringify({ type: 'subscribe', topics: [] }));
      await c.until(() => c.frames.filter((f) => f.type === 'subscriptions').length === 3, 'the third answer');
      assert.deepEqual(c.frames.at(-1), { type: 'subscriptions', subscriptions: ['b'], failed: [] });
      const http = await r.relay.updateSubscriptions({ sessionId: c.config.session_id, add: [], remove: [] });
      assert.deepEqual(http.subscriptions, ['b']);
      c.close();
    } finally {
      await r.close();
    }
  });

  it('lists a topic whose broker subscription failed in `failed`, with the stream error too', async () => {
    const r = await startWsRelay();
    try {
      const c = await WsClient.open(`${r.ws}?topics=a`);
      const broker = r.relay.core.broker as unknown as { beginOutage(): void; endOutage(): void };
      broker.beginOutage();
      const answer = await c.request({ type: 'subscribe', topics: ['down'] }, 1);
      broker.endOutage();
      assert.deepEqual(answer.subscriptions, ['a']);
      assert.equal(answer.failed.length, 1);
      assert.equal(answer.failed[0].topic, 'down');
      assert.equal(answer.failed[0].code, 'subscription-failure');
      await c.until(() => c.errors().some((e) => e.code === 'subscription-failure' && e.topic === 'down'), 'the stream error');
      c.close();
    } finally {
      await r.close();
    }
  });

  it('answers bad frames with an error frame and keeps the connection; a rejected change changes nothing', async () => {
    const r = await startWsRelay({ maxTopicsPerSession: 3 });
    try {
      const c = await WsClient.open(`${r.ws}?topics=a`);
      const answers: any[] = [];
      const send = async (raw: string) => {
        const before = c.frames.length;
        c.socket.send(raw);
        await c.until(() => c.frames.length > before, `an answer to ${raw}`);
        answers.push(c.frames.at(-1));
      };
      await send('not json');
      await send('[1,2]');
      await send(JSON.stringify({ type: 'publish', topics: ['a'] }));
      await send(JSON.stringify({ type: 'subscribe', topics: 'a,b' }));
      await send(JSON.stringify({ type: 'subscribe', topics: ['b', 42] }));
      await send(JSON.stringify({ type: 'subscribe', topics: ['b', '/livepipe/reserved'] }));
      await send(JSON.stringify({ type: 'subscribe', topics: ['b', 'c', 'd'] }));
      assert.deepEqual(
        answers.map((a) => a.error?.code),
        ['bad-request', 'bad-request', 'bad-request', 'bad-request', 'bad-request', 'invalid-topic', 'too-many-topics'],
      );
      assert.match(answers[0].error.message, /malformed JSON/);
      assert.match(answers[2].error.message, /unknown frame type "publish"/);
      assert.match(answers[5].error.message, /reserved/);
      assert.equal(answers[5].error.topic, '/livepipe/reserved');
      assert.match(answers[6].error.message, /at most 3 topics/);
      assert.equal(c.closed, undefined, 'the connection stays open');

      // Nothing of the rejected frames applied, and the connection still works.
      const ok = await c.request({ type: 'subscribe', topics: ['b'] }, 9);
      assert.deepEqual(ok.subscriptions, ['a', 'b']);
      const bad = await c.request({ type: 'unsubscribe', topics: ['x,y'] }, 10);
      assert.equal(bad.error.code, 'invalid-topic');
      await r.relay.publish('b', 'still streaming');
      await c.until(() => c.messages().length === 1, 'a message');
      c.close();
    } finally {
      await r.close();
    }
  });

  it('closes with 1009 on a frame larger than the limit', async () => {
    const r = await startWsRelay({ maxBodyBytes: 1024 });
    try {
      const c = await WsClient.open(`${r.ws}?topics=a`);
      c.socket.send(JSON.stringify({ type: 'subscribe', topics: ['a'.repeat(2000)] }));
      await c.until(() => c.closed !== undefined, 'the close');
      assert.equal(c.closed!.code, 1009);
    } finally {
      await r.close();
    }
  });

  it('refuses bad stream requests with an error frame and close code 1008, creating no session', async () => {
    const r = await startWsRelay({ maxTopicsPerSession: 2 });
    try {
      const bad = await WsClient.open(`${r.ws}?topics=a,${encodeURIComponent('/httpsub/x')}`);
      await bad.until(() => bad.closed !== undefined, 'the close');
      assert.equal(bad.frames.length, 1);
      assert.equal(bad.frames[0].error.code, 'invalid-topic');
      assert.deepEqual(bad.closed, { code: 1008, reason: 'invalid-topic' });

      const many = await WsClient.open(`${r.ws}?topics=a,b,c`);
      await many.until(() => many.closed !== undefined, 'the close');
      assert.equal(many.frames[0].error.code, 'too-many-topics');
      assert.equal(many.closed!.code, 1008);
      assert.equal(r.relay.stats().sessions, 0);
    } finally {
      await r.close();
    }
  });

  it('resumes across a dropped connection with last_event_id: same session, every missed message once, in order', async () => {
    const r = await startWsRelay();
    try {
      const first = await WsClient.open(`${r.ws}?topics=t,u`);
      for (let i = 0; i < 3; i++) await r.relay.publish('t', `m${i}`);
      await first.until(() => first.messages().length === 3, 'three messages');
      const lastId = first.messages().at(-1).id;
      first.close(); // dropped, no close handshake
      await waitFor(() => (r.relay.stats().connections.ws ?? 0) === 0, 'the relay to see the drop');

      for (let i = 3; i < 8; i++) await r.relay.publish(i % 2 ? 't' : 'u', `m${i}`);
      const again = await WsClient.open(`${r.ws}?topics=ignored&last_event_id=${encodeURIComponent(lastId)}`);
      assert.equal(again.config.resumed, true);
      assert.equal(again.config.session_id, first.config.session_id);
      assert.deepEqual(again.config.subscriptions, ['t', 'u']);
      await again.until(() => again.messages().length === 5, 'the replay');
      await r.relay.publish('t', 'm8');
      await again.until(() => again.messages().length === 6, 'a live message after the replay');
      assert.deepEqual([...first.messages(), ...again.messages()].map((m) => m.payload), ['m0', 'm1', 'm2', 'm3', 'm4', 'm5', 'm6', 'm7', 'm8']);
      assert.equal(again.errors().length, 0);

      // session_id= alone resumes too, from where the session was.
      again.close();
      await waitFor(() => (r.relay.stats().connections.ws ?? 0) === 0, 'the relay to see the drop');
      await r.relay.publish('u', 'm9');
      const third = await WsClient.open(`${r.ws}?session_id=${first.config.session_id}`);
      assert.equal(third.config.resumed, true);
      await third.until(() => third.messages().length === 1, 'the message published while away');
      assert.equal(third.messages()[0].payload, 'm9');
      third.close();
    } finally {
      await r.close();
    }
  });

  it('a second connection for the session takes over: the first is closed with 1000', async () => {
    const r = await startWsRelay();
    try {
      const first = await WsClient.open(`${r.ws}?topics=t`);
      const second = await WsClient.open(`${r.ws}?session_id=${first.config.session_id}`);
      assert.equal(second.config.resumed, true);
      await first.until(() => first.closed !== undefined, 'the first to close');
      assert.equal(first.closed!.code, 1000);
      assert.match(first.closed!.reason, /took over/);
      await r.relay.publish('t', 'to the second');
      await second.until(() => second.messages().length === 1, 'the message');
      assert.equal(first.messages().length, 0);
      assert.equal(r.relay.stats().connections.ws, 1);
      second.close();
    } finally {
      await r.close();
    }
  });

  it('a client that stops reading is bounded and told what it lost, while another keeps receiving everything', { timeout: 120_000 }, async () => {
    const OUTBOX = 1024 * 1024;
    const r = await startWsRelay({ heartbeatMs: 60_000, outbox: { maxBytes: OUTBOX, maxMessages: 1000 }, history: { maxBytes: OUTBOX } });
    try {
      const slow = await WsClient.open(`${r.ws}?topics=t&who=slow`);
      slow.socket.pause(); // stops reading: its kernel buffers fill and the relay sees backpressure
      const fast = await WsClient.open(`${r.ws}?topics=t`);
      const body = (i: number) => `${i}:${'x'.repeat(64 * 1024)}`;
      const indexOf = (m: any) => Number(m.payload.slice(0, m.payload.indexOf(':')));

      const total = 320; // 20 MB: far more than the slow socket's buffers hold
      let mostHeld = 0;
      for (let i = 0; i < total; i += 8) {
        await Promise.all([...Array(8).keys()].map((j) => r.relay.publish('t', body(i + j))));
        await fast.until(() => fast.messages().length >= i + 8, `the fast reader to get ${i + 7}`, 10_000);
        mostHeld = Math.max(mostHeld, r.sockets.get('slow')!.writableLength);
      }
      assert.deepEqual(fast.messages().map(indexOf), [...Array(total).keys()]);
      assert.ok(r.relay.stats().messagesDropped > 0, 'the slow reader fell behind by more than its outbox');
      assert.ok(mostHeld <= 2 * OUTBOX, `the relay held ${mostHeld} bytes for the slow reader`);

      slow.socket.resume();
      await slow.until(() => slow.errors().length >= 1, 'events-lost', 10_000);
      await r.relay.publish('t', body(total));
      await slow.until(() => slow.messages().some((m) => indexOf(m) === total), 'the later message', 10_000);
      // Every message arrived in order, or was counted by the events-lost just before the next one.
      let next = 0;
      for (const frame of slow.frames.slice(1)) {
        if (frame.error) {
          assert.equal(frame.error.code, 'events-lost');
          next += frame.error.count;
          continue;
        }
        assert.equal(indexOf(frame), next, 'a message missing without an events-lost that counts it');
        next++;
      }
      assert.equal(next, total + 1);
      slow.close();
      fast.close();
    } finally {
      await r.close();
    }
  });

  it('pings every heartbeat and cuts off a client that does not answer', async () => {
    const r = await startWsRelay({ heartbeatMs: 50 });
    try {
      const alive = await WsClient.open(`${r.ws}?topics=t`);
      const mute = await WsClient.open(`${r.ws}?topics=t`, { autoPong: false });
      await mute.until(() => mute.closed !== undefined, 'the mute client to be cut off');
      assert.equal(mute.closed!.code, 1006, 'terminated without a close frame');
      assert.ok(mute.pings >= 1);
      await alive.until(() => alive.pings >= 4, 'more pings');
      assert.equal(alive.closed, undefined, 'a client that answers stays connected');
      alive.close();
    } finally {
      await r.close();
    }
  });

  it('closes every connection with 1001 when the relay closes, and refuses new ones with 1001', async () => {
    const r = await startWsRelay();
    const a = await WsClient.open(`${r.ws}?topics=t`);
    const b = await WsClient.open(`${r.ws}?topics=u`);
    const closing = r.relay.close();
    await a.until(() => a.closed !== undefined, 'a to close');
    await b.until(() => b.closed !== undefined, 'b to close');
    assert.deepEqual(a.closed, { code: 1001, reason: 'relay shutting down' });
    assert.equal(b.closed!.code, 1001);
    await closing;
    const late = await WsClient.open(`${r.ws}?topics=t`);
    await late.until(() => late.closed !== undefined, 'the late one to close');
    assert.equal(late.frames[0].error.code, 'broker-unavailable');
    assert.equal(late.closed!.code, 1001);
    await r.close();
  });

  it('takes browser connections from its own origin or the cors origins only', async () => {
    const r = await startWsRelay({ cors: { origins: ['https://app.example'] } });
    try {
      const host = new URL(r.base).host;
      const refused = await new Promise<number>((resolve) => {
        const ws = new WebSocket(`${r.ws}?topics=t`, { origin: 'https://evil.example' });
        ws.on('unexpected-response', (_req, res) => {
          resolve(res.statusCode ?? 0);
          ws.terminate();
        });
        ws.on('error', () => {});
      });
      assert.equal(refused, 403);
      for (const origin of ['https://app.example', `http://${host}`]) {
        const c = await WsClient.open(`${r.ws}?topics=t`, { origin });
        assert.equal(c.frames[0].topic, '/httpsub/config', origin);
        c.close();
      }
    } finally {
      await r.close();
    }
  });

  it('answers a plain GET /ws with 400, and leaves upgrades for other paths to the caller', async () => {
    const r = await startWsRelay();
    try {
      const res = await fetch(`${r.base}/ws`);
      assert.equal(res.status, 400);
      assert.match(((await res.json()) as any).error.message, /WebSocket endpoint/);
      const other = await new Promise<string>((resolve) => {
        const ws = new WebSocket(`${r.ws.replace('/ws', '/events')}`);
        ws.on('error', (err) => resolve(err.message));
      });
      assert.match(other, /socket hang up|ECONNRESET/, 'destroyed by the test server: handleUpgrade returned false');
    } finally {
      await r.close();
    }
  });
});

describe('the livepipe command', () => {
  it('serves /ws, answers other upgrades 404, and closes WebSockets with 1001 on SIGTERM', async () => {
    ensureBuilt();
    const lp = new LivepipeProcess(['--port', '0']);
    try {
      const { base } = await lp.started();
      const ws = base.replace('http:', 'ws:');
      const c = await WsClient.open(`${ws}/ws?topics=news`);
      assert.deepEqual(c.config.subscriptions, ['news']);
      await fetch(`${base}/publish?topic=news`, { method: 'POST', body: 'hi' });
      await c.until(() => c.messages().length === 1, 'the message');
      assert.equal(c.messages()[0].payload, 'hi');
      const status = await new Promise<number>((resolve) => {
        const other = new WebSocket(`${ws}/events`);
        other.on('unexpected-response', (_req, res) => resolve(res.statusCode ?? 0));
        other.on('error', () => {});
      });
      assert.equal(status, 404);
      const exit = lp.stop('SIGTERM');
      await c.until(() => c.closed !== undefined, 'the close');
      assert.equal(c.closed!.code, 1001);
      assert.deepEqual(await exit, { code: 0, signal: null });
    } finally {
      await lp.kill();
    }
  });
});

async function waitFor(predicate: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}
