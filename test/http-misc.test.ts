import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { createRelay, MemBroker, type Relay, type RelayOptions } from '../src/index.ts';
import { startRelay } from './support/relay.ts';

// Routing, methods, CORS, health, readiness, metrics and custom paths, checked twice: through
// the node:http handler over a real socket, and through the web `relay.fetch` handler called
// directly with `new Request(...)`. Both answer with a fetch Response, so one suite serves both.

interface Target {
  relay: Relay;
  send(path: string, init?: RequestInit): Promise<Response>;
  close(): Promise<void>;
}

type Make = (options?: Partial<RelayOptions>) => Promise<Target>;

const overNode: Make = async (options = {}) => {
  const r = await startRelay(options);
  return { relay: r.relay, send: (path, init) => fetch(r.base + path, init), close: () => r.close() };
};

const overFetchHandler: Make = async (options = {}) => {
  // The fetch handler cannot see its listener, so HTTP publishing is switched on explicitly.
  const relay = await createRelay({ broker: `mem://misc-${process.pid}-${Math.random()}`, publish: true, ...options });
  return { relay, send: (path, init) => relay.fetch(new Request(`http://relay.test${path}`, init)), close: () => relay.close() };
};

async function assertJsonError(res: Response, status: number, code: string): Promise<any> {
  assert.equal(res.status, status);
  assert.match(res.headers.get('content-type') ?? '', /^application\/json/);
  const body: any = await res.json();
  assert.equal(body.error?.code, code, JSON.stringify(body));
  assert.ok(typeof body.error.message === 'string' && body.error.message.length > 0);
  return body;
}

/** Reads SSE events (their `data:` JSON) from a Response body. */
class EventStream {
  readonly events: any[] = [];
  private readonly reader: ReadableStreamDefaultReader<Uint8Array>;
  private readonly done: Promise<void>;

  constructor(res: Response) {
    assert.equal(res.status, 200);
    assert.equal(res.headers.get('content-type'), 'text/event-stream; charset=utf-8');
    this.reader = res.body!.getReader();
    this.done = this.pump();
  }

  messages(): any[] {
    return this.events.filter((e) => e.topic !== undefined && e.topic !== '/httpsub/config');
  }

  async until(predicate: () => boolean, what: string): Promise<void> {
    await waitFor(async () => predicate(), what);
  }

  async close(): Promise<void> {
    await this.reader.cancel();
    await this.done;
  }

  private async pump(): Promise<void> {
    const decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const { value, done } = await this.reader.read().catch(() => ({ value: undefined, done: true as const }));
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end: number;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const data = buffer.slice(0, end).split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart());
        buffer = buffer.slice(end + 2);
        if (data.length > 0) this.events.push(JSON.parse(data.join('\n')));
      }
    }
  }
}

/** Polls `check` until it holds (or fails after 5 s, naming what it waited for). */
async function waitFor(check: () => Promise<boolean>, what: string): Promise<void> {
  const deadline = Date.now() + 5000;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** One sample of a Prometheus text exposition; a series that is absent reads as 0. */
function sample(text: string, series: string): number {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? 0 : Number(line.slice(series.length + 1));
}

const modes: Array<[string, Make]> = [
  ['node:http handler', overNode],
  ['web fetch handler', overFetchHandler],
];

for (const [mode, make] of modes) {
  describe(`HTTP misc (${mode})`, () => {
    const open: Target[] = [];
    const start = async (options?: Partial<RelayOptions>) => {
      const t = await make({ heartbeatMs: 60_000, ...options });
      open.push(t);
      return t;
    };
    after(async () => {
      for (const t of open) await t.close();
    });

    it('streams events: config first, then a published message; update and publish work', async () => {
      const t = await start();
      const s = new EventStream(await t.send('/events?topics=a'));
      await s.until(() => s.events.length >= 1, 'config');
      const config = s.events[0];
      assert.equal(config.topic, '/httpsub/config');
      assert.deepEqual(config.payload.subscriptions, ['a']);
      const sid = config.payload.session_id;
      assert.equal((await t.send('/publish?topic=a', { method: 'POST', body: 'first' })).status, 204);
      await s.until(() => s.messages().length >= 1, 'first message');
      assert.deepEqual(s.messages()[0], { topic: 'a', payload: 'first' });

      const up = await t.send('/update_subscriptions', { method: 'POST', body: JSON.stringify({ session_id: sid, add: ['b'], remove: ['a'] }) });
      assert.equal(up.status, 200);
      assert.deepEqual(await up.json(), { session_id: sid, subscriptions: ['b'], failed: [] });
      assert.equal((await t.send('/publish?topic=a', { method: 'POST', body: 'gone' })).status, 204);
      assert.equal((await t.send('/publish?topic=b', { method: 'POST', body: new Uint8Array([0xff, 0x00]) })).status, 204);
      await s.until(() => s.messages().length >= 2, 'second message');
      assert.deepEqual(s.messages(), [{ topic: 'a', payload: 'first' }, { topic: 'b', payload_base64: Buffer.from([0xff, 0x00]).toString('base64') }]);
      await s.close();
    });

    it('answers 413 too-large for update and publish, with and without a content-length', async () => {
      const t = await start({ maxBodyBytes: 64 });
      const big = 'x'.repeat(200);
      await assertJsonError(await t.send('/update_subscriptions', { method: 'POST', body: big, headers: { 'content-length': '200' } }), 413, 'too-large');
      await assertJsonError(await t.send('/publish?topic=a', { method: 'POST', body: big, headers: { 'content-length': '200' } }), 413, 'too-large');
      const streamed = () => ({ method: 'POST', body: new Blob([big]).stream(), duplex: 'half' }) as RequestInit;
      await assertJsonError(await t.send('/update_subscriptions', streamed()), 413, 'too-large');
      await assertJsonError(await t.send('/publish?topic=a', streamed()), 413, 'too-large');
    });

    it('answers an unknown path with 404 not-found JSON', async () => {
      const t = await start();
      await assertJsonError(await t.send('/nope'), 404, 'not-found');
      await assertJsonError(await t.send('/events/extra'), 404, 'not-found');
      await assertJsonError(await t.send('/nope', { method: 'POST', body: 'x' }), 404, 'not-found');
    });

    it('answers a wrong method with 405 and an Allow header', async () => {
      const t = await start();
      const cases: Array<[string, string, string]> = [
        ['GET', '/update_subscriptions', 'POST'],
        ['POST', '/events', 'GET'],
        ['PUT', '/publish', 'POST'],
        ['DELETE', '/healthz', 'GET'],
      ];
      for (const [method, path, allowed] of cases) {
        const res = await t.send(path, { method, body: method === 'GET' ? undefined : 'x' });
        await assertJsonError(res, 405, 'method-not-allowed');
        const allow = (res.headers.get('allow') ?? '').split(',').map((m) => m.trim());
        assert.ok(allow.includes(allowed), `${method} ${path}: Allow: ${res.headers.get('allow')}`);
        assert.ok(!allow.includes(method), `${method} ${path}: Allow: ${res.headers.get('allow')}`);
      }
    });

    it("CORS origins '*': every response carries Access-Control-Allow-Origin: * and JSON POSTs get a preflight answer", async () => {
      const t = await start({ cors: { origins: '*' } });
      const origin = { origin: 'https://any.example' };
      assert.equal((await t.send('/healthz', { headers: origin })).headers.get('access-control-allow-origin'), '*');
      const failed = await t.send('/update_subscriptions', { method: 'POST', body: '{}', headers: { ...origin, 'content-type': 'application/json' } });
      assert.equal(failed.status, 400);
      assert.equal(failed.headers.get('access-control-allow-origin'), '*', 'error answers are readable cross-origin too');
      await failed.body?.cancel();
      const published = await t.send('/publish?topic=a', { method: 'POST', body: 'x', headers: origin });
      assert.equal(published.status, 204);
      assert.equal(published.headers.get('access-control-allow-origin'), '*');
      const stream = await t.send('/events?topics=a', { headers: origin });
      assert.equal(stream.headers.get('access-control-allow-origin'), '*');
      await stream.body?.cancel();

      const preflight = await t.send('/update_subscriptions', {
        method: 'OPTIONS',
        headers: { ...origin, 'access-control-request-method': 'POST', 'access-control-request-headers': 'content-type' },
      });
      assert.equal(preflight.status, 204);
      assert.equal(preflight.headers.get('access-control-allow-origin'), '*');
      assert.match(preflight.headers.get('access-control-allow-methods') ?? '', /\bPOST\b/);
      const allowHeaders = (preflight.headers.get('access-control-allow-headers') ?? '').toLowerCase().split(',').map((h) => h.trim());
      assert.ok(allowHeaders.includes('content-type'), `allow-headers: ${preflight.headers.get('access-control-allow-headers')}`);
      // With '*', the relay does not allow credentials.
      assert.equal(preflight.headers.get('access-control-allow-credentials'), null);
    });

    it('CORS origins list: only a listed origin is echoed (with Vary: Origin)', async () => {
      const t = await start({ cors: { origins: ['https://app.example'] } });
      const ok = await t.send('/healthz', { headers: { origin: 'https://app.example' } });
      assert.equal(ok.headers.get('access-control-allow-origin'), 'https://app.example');
      assert.match(ok.headers.get('vary') ?? '', /\bOrigin\b/i);
      const preflight = await t.send('/update_subscriptions', {
        method: 'OPTIONS',
        headers: { origin: 'https://app.example', 'access-control-request-method': 'POST', 'access-control-request-headers': 'content-type' },
      });
      assert.equal(preflight.status, 204);
      assert.equal(preflight.headers.get('access-control-allow-origin'), 'https://app.example');
      assert.match(preflight.headers.get('access-control-allow-headers') ?? '', /content-type/i);

      for (const origin of ['https://evil.example', 'https://app.example.evil', 'http://app.example']) {
        const other = await t.send('/healthz', { headers: { origin } });
        assert.equal(other.status, 200);
        assert.equal(other.headers.get('access-control-allow-origin'), null, origin);
        const otherPreflight = await t.send('/update_subscriptions', {
          method: 'OPTIONS',
          headers: { origin, 'access-control-request-method': 'POST', 'access-control-request-headers': 'content-type' },
        });
        assert.equal(otherPreflight.headers.get('access-control-allow-origin'), null, origin);
        assert.equal(otherPreflight.headers.get('access-control-allow-methods'), null, origin);
        assert.equal(otherPreflight.headers.get('access-control-allow-headers'), null, origin);
      }
    });

    it('sends no CORS headers without the cors option', async () => {
      const t = await start();
      const res = await t.send('/healthz', { headers: { origin: 'https://app.example' } });
      assert.equal(res.headers.get('access-control-allow-origin'), null);
      const preflight = await t.send('/update_subscriptions', {
        method: 'OPTIONS',
        headers: { origin: 'https://app.example', 'access-control-request-method': 'POST', 'access-control-request-headers': 'content-type' },
      });
      assert.equal(preflight.headers.get('access-control-allow-origin'), null);
      assert.equal(preflight.headers.get('access-control-allow-headers'), null);
    });

    it('GET /healthz answers 200 {"status":"ok"}', async () => {
      const t = await start();
      const res = await t.send('/healthz');
      assert.equal(res.status, 200);
      assert.match(res.headers.get('content-type') ?? '', /^application\/json/);
      assert.deepEqual(await res.json(), { status: 'ok' });
    });

    it('GET /readyz: 200 when ready, 503 during a broker outage and after close', async () => {
      const broker = new MemBroker(`ready-${process.pid}-${Math.random()}`);
      const t = await start({ broker });
      try {
        const ready = await t.send('/readyz');
        assert.equal(ready.status, 200);
        assert.equal(((await ready.json()) as any).status, 'ready');
        broker.beginOutage();
        const down = await t.send('/readyz');
        assert.equal(down.status, 503);
        assert.notEqual(((await down.json()) as any).status, 'ready');
        broker.endOutage();
        assert.equal((await t.send('/readyz')).status, 200);
        await t.relay.close();
        const closed = await t.send('/readyz');
        assert.equal(closed.status, 503);
        assert.notEqual(((await closed.json()) as any).status, 'ready');
        // Liveness is not readiness: a draining relay is still alive.
        assert.equal((await t.send('/healthz')).status, 200);
      } finally {
        await broker.close();
      }
    });

    it('GET /metrics: Prometheus text whose gauges and counters follow connections and messages', async () => {
      const t = await start({ outbox: { maxMessages: 2 }, sessionTtlMs: 100, topicGraceMs: 0 });
      const scrape = async () => {
        const res = await t.send('/metrics');
        assert.equal(res.status, 200);
        assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
        return res.text();
      };
      const conns = 'livepipe_connections{transport="sse"}';
      const until = (what: string, expected: Record<string, number>) =>
        waitFor(async () => {
          const text = await scrape();
          return Object.entries(expected).every(([series, n]) => sample(text, series) === n);
        }, `${what}: ${JSON.stringify(expected)}`);

      const first = await scrape();
      for (const name of ['livepipe_connections', 'livepipe_sessions', 'livepipe_topics', 'livepipe_messages_in_total', 'livepipe_messages_out_total', 'livepipe_messages_dropped_total']) {
        assert.match(first, new RegExp(`^# TYPE ${name} (gauge|counter)$`, 'm'));
      }
      assert.deepEqual(
        ['livepipe_sessions', 'livepipe_topics', 'livepipe_messages_in_total', 'livepipe_messages_out_total', 'livepipe_messages_dropped_total', conns].map((s) => sample(first, s)),
        [0, 0, 0, 0, 0, 0],
      );

      const a = new EventStream(await t.send('/events?topics=m'));
      await until('one client', { [conns]: 1, livepipe_sessions: 1, livepipe_topics: 1 });
      const b = new EventStream(await t.send('/events?topics=m,n'));
      await until('two clients', { [conns]: 2, livepipe_sessions: 2, livepipe_topics: 2 });

      for (const [i, body] of ['1', '2', '3'].entries()) {
        assert.equal((await t.send('/publish?topic=m', { method: 'POST', body })).status, 204);
        await a.until(() => a.messages().length > i, `a: message ${body}`);
        await b.until(() => b.messages().length > i, `b: message ${body}`);
      }
      await until('3 in, 6 out', { livepipe_messages_in_total: 3, livepipe_messages_out_total: 6, livepipe_messages_dropped_total: 0 });

      // Five in one turn exceed b's outbox of 2, but b keeps reading: it is not slow, so nothing is
      // dropped (drops of real slow readers are counted in test/slow-client.test.ts).
      await Promise.all(['4', '5', '6', '7', '8'].map((body) => t.relay.publish('n', body)));
      await b.until(() => b.messages().length >= 8, 'b: all five of the burst');
      assert.equal(b.events.find((e) => e.error !== undefined), undefined);
      assert.deepEqual(b.messages().slice(3).map((m) => m.payload), ['4', '5', '6', '7', '8']);
      await until('burst counted', { livepipe_messages_in_total: 8, livepipe_messages_out_total: 11, livepipe_messages_dropped_total: 0 });

      await a.close();
      await until('a gone, its session expired', { [conns]: 1, livepipe_sessions: 1, livepipe_topics: 2 });
      await b.close();
      await until('everyone gone', { [conns]: 0, livepipe_sessions: 0, livepipe_topics: 0 });
    });

    it('serves every endpoint at custom paths given by the paths option', async () => {
      const t = await start({ paths: { events: '/rt/stream', update: '/rt/sub', publish: '/rt/pub', health: '/live', ready: '/ready', metrics: '/prom' } });
      for (const old of ['/events', '/update_subscriptions', '/healthz', '/readyz', '/metrics']) await assertJsonError(await t.send(old), 404, 'not-found');
      await assertJsonError(await t.send('/publish?topic=a', { method: 'POST', body: 'x' }), 404, 'not-found');

      const s = new EventStream(await t.send('/rt/stream?topics=a'));
      await s.until(() => s.events.length >= 1, 'config');
      const sid = s.events[0].payload.session_id;
      const up = await t.send('/rt/sub', { method: 'POST', body: JSON.stringify({ session_id: sid, add: ['b'] }) });
      assert.deepEqual(await up.json(), { session_id: sid, subscriptions: ['a', 'b'], failed: [] });
      assert.equal((await t.send('/rt/pub?topic=b', { method: 'POST', body: 'moved' })).status, 204);
      await s.until(() => s.messages().length >= 1, 'message');
      assert.deepEqual(s.messages(), [{ topic: 'b', payload: 'moved' }]);
      assert.deepEqual(await (await t.send('/live')).json(), { status: 'ok' });
      assert.equal((await t.send('/ready')).status, 200);
      assert.match(await (await t.send('/prom')).text(), /^livepipe_sessions 1$/m);
      await s.close();
    });
  });
}

describe('relay.handler as middleware', () => {
  it('calls next() for paths that are not its own', async () => {
    const relay = await createRelay({ broker: `mem://mw-${process.pid}-${Math.random()}` });
    const server = createServer((req, res) => {
      void relay.handler(req, res, () => res.writeHead(418).end('app'));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    try {
      const other = await fetch(`${base}/app/page`);
      assert.equal(other.status, 418);
      assert.equal(await other.text(), 'app');
      assert.equal((await fetch(`${base}/healthz`)).status, 200);
    } finally {
      await relay.close();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });
});
