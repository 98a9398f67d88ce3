/**
 * The livepipe/client package: in Node over SSE (the `eventsource` package, injected) and
 * WebSocket (Node's own), against a gochan-format server, and in headless Chromium with the
 * browser's own EventSource and WebSocket.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { EventSource } from 'eventsource';
import type { Browser, Page } from 'playwright-core';
import { chromiumSkip, launchChromium } from './support/browser.ts';
import { backoffDelay, connect, type Client, type ClientError, type ConnectOptions, type ErrorInfo, type Message, type StateChange } from '../client/index.ts';
import { createRelay, type Relay, type RelayOptions } from '../src/index.ts';
import { serveStatic } from '../src/server/static.ts';
import { ROOT } from './support/livepipe.ts';

interface TestServer {
  relay: Relay;
  base: string;
  /** Cuts every TCP connection to the server, as a network failure would. */
  dropAll(): void;
  close(): Promise<void>;
}

/** A relay on node:http with WebSocket upgrades and the static files (the demo page and /client/), as the CLI serves them. */
async function startServer(options: Partial<RelayOptions> = {}): Promise<TestServer> {
  const relay = await createRelay({ broker: `mem://client-${process.pid}-${Math.random()}`, retryMs: 50, ...options });
  const server = createServer((req, res) => void relay.handler(req, res, () => void serveStatic(req, res)));
  const sockets = new Set<Socket>();
  server.on('connection', (socket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
  });
  server.on('upgrade', (req, socket, head) => {
    if (!relay.handleUpgrade(req, socket, head)) socket.destroy();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const dropAll = () => {
    for (const socket of sockets) socket.destroy();
  };
  return {
    relay,
    base: `http://127.0.0.1:${(server.address() as AddressInfo).port}/`,
    dropAll,
    async close() {
      await relay.close();
      dropAll();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** Everything a client reports. */
function record(client: Client) {
  const seen = { messages: [] as Message[], errors: [] as ErrorInfo[], states: [] as StateChange[] };
  client.on('message', (m) => seen.messages.push(m));
  client.on('error', (e) => seen.errors.push(e));
  client.on('state', (s) => seen.states.push(s));
  return seen;
}

async function until(predicate: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

const payloads = (messages: Message[]) => messages.map((m) => m.payload);

describe('backoffDelay', () => {
  it('waits a random time below min(maxMs, initialMs·2^attempt)', () => {
    assert.equal(backoffDelay(0, 100, 1000, () => 0), 0);
    assert.deepEqual([0, 1, 2, 3, 4, 5].map((n) => backoffDelay(n, 100, 1000, () => 0.999999)), [99, 199, 399, 799, 999, 999]);
    assert.deepEqual([0, 1, 2].map((n) => backoffDelay(n, 100, 1000, () => 0.5)), [50, 100, 200]);
    assert.equal(backoffDelay(60, 100, 30_000, () => 0.999999), 29_999, 'no overflow for a large attempt');
  });
});

for (const transport of ['sse', 'ws'] as const) {
  const options = (extra: ConnectOptions = {}): ConnectOptions => ({ transport, EventSource, backoff: { initialMs: 10, maxMs: 100 }, ...extra });

  describe(`the client over ${transport} in Node`, () => {
    it('subscribes and unsubscribes, with handlers per topic and message events for all', async () => {
      const s = await startServer();
      const client = connect(s.base, options({ topics: ['a'] }));
      try {
        const seen = record(client);
        const onB: Message[] = [];
        const subscribing = client.subscribe('b', (m) => onB.push(m)); // before the connection is open: sent once it is
        assert.equal(client.state, 'connecting');
        assert.deepEqual(await subscribing, ['a', 'b']);
        assert.equal(client.state, 'open');
        assert.match(client.sessionId ?? '', /^[\w-]{22}$/);
        assert.deepEqual(client.subscriptions, ['a', 'b']);

        await s.relay.publish('a', 'on a');
        await s.relay.publish('b', 'on b');
        await until(() => seen.messages.length === 2, 'two messages');
        assert.deepEqual(onB.map((m) => [m.topic, m.payload]), [['b', 'on b']]);
        assert.match(seen.messages[0]!.id ?? '', new RegExp(`^${client.sessionId}\\.\\d+$`));

        assert.deepEqual(await client.unsubscribe('a'), ['b']);
        await s.relay.publish('a', 'not delivered');
        await s.relay.publish('b', 'again on b');
        await until(() => seen.messages.length === 3, 'the next message');
        assert.deepEqual(payloads(seen.messages), ['on a', 'on b', 'again on b']);
        assert.deepEqual(seen.errors, []);
      } finally {
        client.close();
        await s.close();
      }
    });

    it('rejects a topic the server refuses with its code, and keeps the stream and the other topics', async () => {
      const s = await startServer({ maxTopicsPerSession: 3 });
      const client = connect(s.base, options({ topics: ['a'] }));
      try {
        const seen = record(client);
        await assert.rejects(client.subscribe('/livepipe/x'), (err: ClientError) => err.code === 'invalid-topic' && /reserved/.test(err.message));
        await assert.rejects(client.subscribe(['b', 'c', 'd']), (err: ClientError) => err.code === 'too-many-topics');
        assert.deepEqual(await client.subscribe('b'), ['a', 'b']);
        await s.relay.publish('b', 'still streaming');
        await until(() => seen.messages.length === 1, 'a message');
        assert.equal(client.state, 'open');
        // The refused topics are not wanted any more: a new session would not ask for them.
        s.dropAll();
        await until(() => seen.states.filter((c) => c.state === 'open').length === 2, 'the reconnect');
        await client.subscribe([]); // after the reconnect's own subscription changes, if any
        assert.deepEqual(client.subscriptions, ['a', 'b']);
        assert.deepEqual(seen.errors, []);
      } finally {
        client.close();
        await s.close();
      }
    });

    it('resumes after the server drops the connection: same session, nothing lost, nothing twice, in order', async () => {
      const s = await startServer();
      const client = connect(s.base, options({ topics: ['t', 'u'] }));
      try {
        const seen = record(client);
        await until(() => client.state === 'open', 'open');
        const sessionId = client.sessionId;
        for (let i = 0; i < 3; i++) await s.relay.publish('t', `m${i}`);
        await until(() => seen.messages.length === 3, 'three messages');

        s.dropAll();
        // Published while the client is away (or before the relay even noticed).
        for (let i = 3; i < 8; i++) await s.relay.publish(i % 2 ? 't' : 'u', `m${i}`);
        await until(() => seen.messages.length === 8, 'the missed messages');
        await s.relay.publish('t', 'm8');
        await until(() => seen.messages.length === 9, 'a live message');

        assert.deepEqual(payloads(seen.messages), ['m0', 'm1', 'm2', 'm3', 'm4', 'm5', 'm6', 'm7', 'm8']);
        assert.equal(client.sessionId, sessionId);
        assert.deepEqual(seen.errors, []);
        client.close();
        assert.deepEqual(
          seen.states.map((c) => c.state),
          ['open', 'reconnecting', 'open', 'closed'],
        );
        assert.equal(seen.states[2]!.resumed, true);
        assert.equal(seen.states[0]!.resumed, false);
      } finally {
        client.close();
        await s.close();
      }
    });

    it('gets its topics back when the session expired while away: a new session with every wanted topic', async () => {
      // The session lives 1 ms after its connection; the client comes back after 200 ms.
      const s = await startServer({ sessionTtlMs: 1, retryMs: 200 });
      const client = connect(s.base, options({ topics: ['a'], backoff: { initialMs: 200, maxMs: 200 }, random: () => 0.999 }));
      try {
        const seen = record(client);
        await client.subscribe(['b', 'c']);
        await client.unsubscribe('a');
        const first = client.sessionId;
        s.dropAll();
        await until(() => seen.states.filter((c) => c.state === 'open').length === 2, 'the new session');
        assert.notEqual(client.sessionId, first);
        assert.equal(seen.states.at(-1)!.resumed, false);
        await until(() => client.subscriptions.length === 2, 'the topics back');
        assert.deepEqual([...client.subscriptions].sort(), ['b', 'c']);
        await s.relay.publish('a', 'not wanted');
        await s.relay.publish('c', 'on c');
        await until(() => seen.messages.length === 1, 'the message on c');
        assert.equal(seen.messages[0]!.payload, 'on c');
      } finally {
        client.close();
        await s.close();
      }
    });

    it('backs off with full jitter, bounded by maxMs, while the relay refuses streams', async () => {
      const s = await startServer();
      const randoms = [0.5, 0.999, 0.25, 0.999, 0.999, 0.1, 0.999];
      let calls = 0;
      const client = connect(s.base, options({ topics: ['t'], backoff: { initialMs: 8, maxMs: 40 }, random: () => randoms[calls++ % randoms.length]! }));
      try {
        const seen = record(client);
        await until(() => client.state === 'open', 'open');
        await s.relay.close(); // streams end, and every new one is refused until the process restarts
        const retries = () => seen.states.filter((c) => c.delayMs !== undefined);
        await until(() => retries().length >= 7, 'seven retries');
        const caps = [8, 16, 32, 40, 40, 40, 40];
        assert.deepEqual(
          retries().slice(0, 7).map((c) => [c.attempt, c.delayMs]),
          caps.map((cap, i) => [i + 1, Math.floor(randoms[i]! * cap)]),
        );
        assert.ok(retries().every((c) => c.state === 'reconnecting' && c.delayMs! < 40));
        if (transport === 'ws') assert.equal(retries()[0]!.code, 1001, 'the relay said it was going away');
      } finally {
        client.close();
        await s.close();
      }
    });

    if (transport === 'ws') {
      it('stops, with the error, when the server refuses the stream itself (close code 1008)', async () => {
        const s = await startServer();
        const client = connect(s.base, options({ topics: ['/httpsub/config'] }));
        try {
          const seen = record(client);
          await until(() => client.state === 'closed', 'closed');
          assert.deepEqual(seen.errors.map((e) => e.code), ['invalid-topic']);
          assert.deepEqual(seen.states.map((c) => c.state), ['closed']);
          await assert.rejects(client.subscribe('a'), (err: ClientError) => err.code === 'closed');
        } finally {
          client.close();
          await s.close();
        }
      });
    }
  });
}

describe('the client against a gochan-format server', () => {
  it('needs only /events, /update_subscriptions and the config event', async () => {
    // What gochan sends: a config event with just the session id, messages without ids, and a
    // bare 200 to update_subscriptions. A stand-in, since gochan (Go) is not available here.
    const updates: unknown[] = [];
    let stream: import('node:http').ServerResponse | undefined;
    const server: Server = createServer((req, res) => {
      if (req.url?.startsWith('/events?')) {
        assert.equal(new URL(req.url, 'http://x').searchParams.get('topics'), 'a');
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.write(`data: ${JSON.stringify({ topic: '/httpsub/config', payload: { session_id: 'gochan-session' } })}\n\n`);
        stream = res;
        return;
      }
      let body = '';
      req.on('data', (chunk: Buffer) => (body += chunk));
      req.on('end', () => {
        updates.push(JSON.parse(body));
        res.writeHead(200).end();
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const client = connect(`http://127.0.0.1:${(server.address() as AddressInfo).port}`, { topics: ['a'], EventSource });
    try {
      const onB: Message[] = [];
      assert.deepEqual(await client.subscribe('b', (m) => onB.push(m)), ['a', 'b']);
      assert.equal(client.sessionId, 'gochan-session');
      assert.deepEqual(updates, [{ session_id: 'gochan-session', add: ['b'], remove: [] }]);
      stream!.write(`data: ${JSON.stringify({ topic: 'b', payload: 'from gochan' })}\n\n`);
      await until(() => onB.length === 1, 'the message');
      assert.deepEqual(onB, [{ topic: 'b', payload: 'from gochan' }]);
      assert.deepEqual(await client.unsubscribe('a'), ['b']);
      assert.deepEqual(updates.at(-1), { session_id: 'gochan-session', add: [], remove: ['a'] });
    } finally {
      client.close();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });
});

// The callbacks given to page.evaluate run in the browser; the project's types have no DOM.
declare const window: { lp: { client: Client; messages: Message[]; states: StateChange[] } };

describe('the client in Chromium', { skip: chromiumSkip }, () => {
  let s: TestServer;
  let browser: Browser;
  let page: Page;
  const pageErrors: string[] = [];

  before(async () => {
    // The browser loads the compiled client: build it when it is missing or older than its source.
    const built = `${ROOT}dist/client/index.js`;
    if (!existsSync(built) || statSync(built).mtimeMs < statSync(`${ROOT}client/index.ts`).mtimeMs) {
      execFileSync(process.execPath, [`${ROOT}node_modules/typescript/bin/tsc`, '-p', `${ROOT}client/tsconfig.json`], { stdio: 'inherit' });
    }
    s = await startServer();
    browser = await launchChromium();
    page = await browser.newPage();
    page.setDefaultTimeout(10_000);
    page.on('pageerror', (err) => pageErrors.push(err.message));
    await page.goto(`${s.base}healthz`); // any page of the relay's origin
  });

  after(async () => {
    await browser?.close();
    await s?.close();
  });

  for (const transport of ['sse', 'ws'] as const) {
    it(`streams, subscribes and resumes over the browser's own ${transport === 'sse' ? 'EventSource' : 'WebSocket'}`, async () => {
      await page.evaluate(async (transport) => {
        const url = '/client/index.js';
        const { connect } = await import(url);
        const lp = { client: undefined as unknown as Client, messages: [] as Message[], states: [] as StateChange[] };
        lp.client = connect('/', { topics: ['a'], transport, backoff: { initialMs: 10, maxMs: 50 } });
        lp.client.on('state', (c: StateChange) => lp.states.push(c));
        window.lp = lp;
        await lp.client.subscribe('b', (m: Message) => lp.messages.push(m));
      }, transport);
      const sessionId = await page.evaluate(() => window.lp.client.sessionId);
      assert.match(sessionId ?? '', /^[\w-]{22}$/);

      await s.relay.publish('a', 'no handler on a');
      for (let i = 0; i < 3; i++) await s.relay.publish('b', `m${i}`);
      await page.waitForFunction(() => window.lp.messages.length === 3);
      s.dropAll();
      for (let i = 3; i < 6; i++) await s.relay.publish('b', `m${i}`);
      await page.waitForFunction(() => window.lp.messages.length === 6);

      const result = await page.evaluate(() => {
        const { client, messages, states } = window.lp;
        client.close();
        return { sessionId: client.sessionId, payloads: messages.map((m) => m.payload), ids: messages.map((m) => m.id), states: states.map((c) => [c.state, c.resumed ?? null]) };
      });
      assert.deepEqual(result.payloads, ['m0', 'm1', 'm2', 'm3', 'm4', 'm5']);
      assert.equal(result.sessionId, sessionId, 'the same session, resumed');
      assert.ok(result.ids.every((id) => id?.startsWith(`${sessionId}.`)));
      assert.deepEqual(result.states, [['open', false], ['reconnecting', null], ['open', true], ['closed', null]]);
      assert.deepEqual(pageErrors, []);
    });
  }
});
