/**
 * The relay mounted in the frameworks users run it in — node:http, Express 5, Fastify 5 and Hono
 * on @hono/node-server — each checked end to end with the `eventsource` client, exactly as the
 * README shows it.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import express from 'express';
import Fastify, { type FastifyInstance } from 'fastify';
import { Hono, type Context } from 'hono';
import { mount } from 'hono/mount';
import { serve } from '@hono/node-server';
import { EventSource } from 'eventsource';
import { createRelay, livepipeFastify, type Relay, type RelayOptions } from '../src/index.ts';
import { SseReader, post } from './support/relay.ts';

const newRelay = (options: Partial<RelayOptions> = {}) => createRelay({ broker: `mem://frameworks-${process.pid}-${Math.random()}`, ...options });

async function waitFor(predicate: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

const sseConnections = (relay: Relay) => relay.stats().connections.sse ?? 0;

/** An `eventsource` client that keeps every event's parsed data. */
class Client {
  readonly es: EventSource;
  readonly events: MessageEvent[] = [];
  constructor(url: string) {
    this.es = new EventSource(url);
    this.es.onmessage = (event) => void this.events.push(event);
  }
  get config(): any {
    return JSON.parse(this.events[0]!.data).payload;
  }
  messages(): any[] {
    return this.events.slice(1).map((e) => JSON.parse(e.data));
  }
  close(): void {
    this.es.close();
  }
}

function listening(server: Server): Promise<string> {
  return new Promise((resolve, reject) => {
    const done = () => resolve(`http://127.0.0.1:${(server.address() as AddressInfo).port}`);
    if (server.listening) return done();
    server.once('listening', done).once('error', reject);
  });
}

function closeServer(server: Server): Promise<void> {
  server.closeAllConnections();
  return new Promise((resolve) => server.close(() => resolve()));
}

/**
 * What every integration must do: open a stream, read config, add a topic with
 * update_subscriptions (JSON or form), get messages published over HTTP and in process,
 * answer a bad update with the JSON error, and notice the client leaving.
 */
async function endToEnd(base: string, relay: Relay, { form = false } = {}): Promise<void> {
  const client = new Client(`${base}/events?topics=a`);
  try {
    await waitFor(() => client.events.length >= 1, 'the config event');
    const config = client.config;
    assert.deepEqual(config.subscriptions, ['a']);
    assert.equal(config.resumed, false);
    const sid: string = config.session_id;

    const update = form
      ? await post(`${base}/update_subscriptions`, new URLSearchParams({ session_id: sid, sub_topics: 'b' }).toString(), { 'content-type': 'application/x-www-form-urlencoded' })
      : await post(`${base}/update_subscriptions`, JSON.stringify({ session_id: sid, add: ['b'] }));
    assert.equal(update.status, 200);
    assert.deepEqual(update.body, { session_id: sid, subscriptions: ['a', 'b'], failed: [] });

    assert.equal((await post(`${base}/publish?topic=b`, 'over http', { 'content-type': 'text/plain' })).status, 204);
    await relay.publish('a', 'in process');
    await waitFor(() => client.messages().length >= 2, 'two messages');
    assert.deepEqual(client.messages(), [
      { topic: 'b', payload: 'over http' },
      { topic: 'a', payload: 'in process' },
    ]);
    assert.ok(client.events.every((e) => e.lastEventId.startsWith(`${sid}.`)));

    const bad = await post(`${base}/update_subscriptions`, JSON.stringify({ session_id: sid, add: ['/livepipe/reserved'] }));
    assert.equal(bad.status, 400);
    assert.equal(bad.headers.get('content-type'), 'application/json; charset=utf-8');
    assert.equal(bad.body.error.code, 'invalid-topic');
    const unknown = await post(`${base}/update_subscriptions`, JSON.stringify({ session_id: 'nope', add: ['c'] }));
    assert.equal(unknown.status, 404);
    assert.equal(unknown.body.error.code, 'unknown-session');
  } finally {
    client.close();
  }
  await waitFor(() => sseConnections(relay) === 0, 'the relay to notice the client left');
}

describe('node:http', () => {
  let relay: Relay;
  let server: Server;
  let base: string;
  before(async () => {
    relay = await newRelay();
    server = createServer((req, res) => relay.handler(req, res)).listen(0, '127.0.0.1');
    base = await listening(server);
  });
  after(async () => {
    await relay.close();
    await closeServer(server);
  });

  it('serves the relay end to end', () => endToEnd(base, relay));

  it('answers other paths with a JSON 404', async () => {
    const res = await fetch(`${base}/elsewhere`);
    assert.equal(res.status, 404);
    assert.equal(((await res.json()) as any).error.code, 'not-found');
  });
});

describe('Express 5', () => {
  let relay: Relay;
  let server: Server;
  let base: string;
  before(async () => {
    relay = await newRelay();
    const app = express();
    // Mounted before the body parsers, the relay reads bodies itself (raw bytes for /publish).
    app.use(relay.handler);
    app.use(express.json());
    app.use(express.urlencoded());
    // Mounted after them (here under a prefix), it takes the body the app already parsed.
    app.use('/live', relay.handler);
    app.post('/echo', (req, res) => void res.json({ echoed: req.body }));
    server = app.listen(0, '127.0.0.1');
    base = await listening(server);
  });
  after(async () => {
    await relay.close();
    await closeServer(server);
  });

  it('serves the relay end to end', () => endToEnd(base, relay));

  it('reads the form shape', () => endToEnd(base, relay, { form: true }));

  it('mounted before the parsers, publishes the exact bytes and answers malformed JSON itself', async () => {
    const client = new Client(`${base}/events?topics=j`);
    try {
      await waitFor(() => client.events.length >= 1, 'the config event');
      const body = '{ "spaced":  true }';
      assert.equal((await post(`${base}/publish?topic=j`, body)).status, 204);
      await waitFor(() => client.messages().length >= 1, 'a message');
      assert.deepEqual(client.messages(), [{ topic: 'j', payload: body }]);
    } finally {
      client.close();
    }
    const malformed = await post(`${base}/update_subscriptions`, '{"session_id":');
    assert.equal(malformed.status, 400);
    assert.equal(malformed.body.error.code, 'bad-request');
  });

  it('under a prefix with app.use("/live", relay.handler), after express.json(): takes the parsed JSON body', () => endToEnd(`${base}/live`, relay));

  it('after express.urlencoded(): takes the parsed form', () => endToEnd(`${base}/live`, relay, { form: true }));

  it('passes other paths on to the app', async () => {
    const res = await post(`${base}/echo`, JSON.stringify({ x: 1 }));
    assert.equal(res.status, 200);
    assert.deepEqual(res.body, { echoed: { x: 1 } });
  });

  it('after the parsers, reads a body none of them took (text/plain to update_subscriptions)', async () => {
    const client = new Client(`${base}/live/events`);
    try {
      await waitFor(() => client.events.length >= 1, 'the config event');
      // fetch sends a string body as text/plain, which express.json() leaves unread.
      const res = await fetch(`${base}/live/update_subscriptions`, { method: 'POST', body: JSON.stringify({ session_id: client.config.session_id, add: ['t'] }) });
      assert.equal(res.status, 200);
      assert.deepEqual(((await res.json()) as any).subscriptions, ['t']);
    } finally {
      client.close();
    }
  });
});

describe('Fastify 5 with livepipeFastify(relay)', () => {
  let relay: Relay;
  let app: FastifyInstance;
  let base: string;
  before(async () => {
    relay = await newRelay();
    app = Fastify();
    await app.register(livepipeFastify(relay));
    app.post('/echo', async (request) => ({ echoed: request.body }));
    base = await app.listen({ port: 0, host: '127.0.0.1' });
  });
  after(async () => {
    await app.close();
    await relay.close();
  });

  it('serves the relay end to end', () => endToEnd(base, relay));

  it('reads the form shape (Fastify has no form parser of its own)', () => endToEnd(base, relay, { form: true }));

  it('answers malformed JSON with the relay error, not a Fastify one', async () => {
    const res = await post(`${base}/update_subscriptions`, '{"session_id":');
    assert.equal(res.status, 400);
    assert.equal(res.body.error.code, 'bad-request');
  });

  it('answers OPTIONS and a wrong method as the relay does', async () => {
    const wrong = await fetch(`${base}/events`, { method: 'DELETE' });
    assert.equal(wrong.status, 405);
    assert.equal(((await wrong.json()) as any).error.code, 'method-not-allowed');
    const options = await fetch(`${base}/update_subscriptions`, { method: 'OPTIONS' });
    assert.equal(options.status, 204);
    assert.equal(options.headers.get('allow'), 'POST, OPTIONS');
  });

  it('leaves the rest of the app to Fastify, and serves /healthz', async () => {
    const res = await post(`${base}/echo`, JSON.stringify({ x: 1 }));
    assert.deepEqual(res.body, { echoed: { x: 1 } });
    assert.equal((await fetch(`${base}/healthz`)).status, 200);
  });

  it('refuses a prefix, whose paths the relay would not answer', async () => {
    const other = Fastify();
    try {
      await assert.rejects(async () => {
        await other.register(livepipeFastify(relay), { prefix: '/live' });
      }, /without a prefix/);
    } finally {
      await other.close().catch(() => {});
    }
  });

  it('ends open streams cleanly on fastify.close()', async () => {
    const own = await newRelay();
    const server = Fastify();
    await server.register(livepipeFastify(own));
    const url = await server.listen({ port: 0, host: '127.0.0.1' });
    const reader = await SseReader.open(`${url}/events?topics=a`);
    try {
      await reader.until(() => reader.events.length >= 1, 5000, 'config');
      const closing = server.close();
      await reader.until(() => reader.ended, 5000, 'the stream to end');
      // complete: the chunked body was terminated properly, not cut off.
      assert.equal(reader.response.complete, true);
      await closing;
      assert.equal(own.isReady(), false);
    } finally {
      // Only needed when the test fails: an open stream would keep the server from closing.
      server.server.closeAllConnections();
      await own.close();
    }
  });
});

// The fetch handler cannot see which address a request arrived on, so POST /publish, on by
// default only for loopback requests, needs publish: true there.
describe('Hono on @hono/node-server', () => {
  let relay: Relay;
  let server: Server;
  let base: string;
  before(async () => {
    relay = await newRelay({ publish: true });
    const app = new Hono();
    const toRelay = (c: Context) => relay.fetch(c.req.raw);
    app.all('/events', toRelay);
    app.all('/update_subscriptions', toRelay);
    app.all('/publish', toRelay);
    app.all('/live/*', mount(relay.fetch));
    app.get('/', (c) => c.text('the app'));
    server = serve({ fetch: app.fetch, port: 0, hostname: '127.0.0.1' }) as Server;
    base = await listening(server);
  });
  after(async () => {
    await relay.close();
    await closeServer(server);
  });

  it('serves the relay end to end through relay.fetch', () => endToEnd(base, relay));

  it('reads the form shape', () => endToEnd(base, relay, { form: true }));

  it('serves it under a prefix with mount(relay.fetch)', () => endToEnd(`${base}/live`, relay));

  it('streams: events arrive while the response is open, and a client leaving is noticed', async () => {
    const reader = await SseReader.open(`${base}/events?topics=s`);
    await reader.until(() => reader.events.length >= 1, 5000, 'config');
    assert.equal(reader.response.headers['content-type'], 'text/event-stream; charset=utf-8');
    await relay.publish('s', 'live');
    await reader.until(() => reader.messages().length >= 1, 5000, 'a message');
    assert.equal(reader.ended, false);
    assert.equal(sseConnections(relay), 1);
    reader.close();
    await waitFor(() => sseConnections(relay) === 0, 'the relay to notice the client left');
  });

  it('notices a client leaving a mounted stream too', async () => {
    const reader = await SseReader.open(`${base}/live/events?topics=s`);
    await reader.until(() => reader.events.length >= 1, 5000, 'config');
    assert.equal(sseConnections(relay), 1);
    reader.close();
    await waitFor(() => sseConnections(relay) === 0, 'the relay to notice the client left');
  });
});

describe('relay.fetch as the whole server (the Bun.serve / Deno.serve shape)', () => {
  let relay: Relay;
  let server: Server;
  let base: string;
  before(async () => {
    relay = await newRelay({ publish: true });
    server = serve({ fetch: relay.fetch, port: 0, hostname: '127.0.0.1' }) as Server;
    base = await listening(server);
  });
  after(async () => {
    await relay.close();
    await closeServer(server);
  });

  it('serves the relay end to end', () => endToEnd(base, relay));
});
