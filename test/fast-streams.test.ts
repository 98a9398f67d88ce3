/**
 * Streams served before node:http (relay.serveStreamsFast, src/http/fast-streams.ts): which
 * request heads it takes, that everything else reaches node:http byte for byte, errors answered
 * as node:http's path answers them, and the server's own connection handling left intact.
 * (The wire format of its streams is checked in sse-wire.test.ts, the eventsource client in
 * eventsource.test.ts, both for either path; the CLI serves streams this way.)
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createServer as createHttpServer, request } from 'node:http';
import { createServer as createH2cServer } from 'node:http2';
import { createServer as createHttpsServer } from 'node:https';
import { connect } from 'node:net';
import { createRelay } from '../src/index.ts';
import { readStreamHead, MAX_STREAM_HEAD_BYTES } from '../src/http/stream-head.ts';
import { RawClient, dechunk } from './support/raw-client.ts';
import { startRelay, SseReader, type RunningRelay } from './support/relay.ts';
import { Waiter } from './support/wait.ts';

const PLAIN = 'GET /events?topics=a,b HTTP/1.1\r\nHost: relay.example\r\nLast-Event-ID: s.3\r\nAccept:   text/event-stream  \r\n\r\n';
const head = (text: string, path = '/events') => readStreamHead(Buffer.from(text, 'latin1'), path);

describe('readStreamHead: the request heads served before node:http', () => {
  it('reads a plain stream request: target, query, and each header by lower-case name, trimmed', () => {
    const read = head(PLAIN);
    assert.ok(read);
    assert.equal(read.target, '/events?topics=a,b');
    assert.equal(read.query, 'topics=a,b');
    assert.deepEqual({ ...read.headers }, { host: 'relay.example', 'last-event-id': 's.3', accept: 'text/event-stream' });
    assert.equal(head('GET /sse HTTP/1.1\r\nHost: x\r\n\r\n', '/sse')?.query, '');
  });

  const declined: [string, string][] = [
    ['another path', 'GET /eventsx?topics=a HTTP/1.1\r\nHost: x\r\n\r\n'],
    ['a percent-encoded path', 'GET /%65vents?topics=a HTTP/1.1\r\nHost: x\r\n\r\n'],
    ['an absolute-form target', 'GET http://x/events?topics=a HTTP/1.1\r\nHost: x\r\n\r\n'],
    ['a space in the target', 'GET /events?topics=a b HTTP/1.1\r\nHost: x\r\n\r\n'],
    ['another method', 'POST /events HTTP/1.1\r\nHost: x\r\n\r\n'],
    ['HEAD', 'HEAD /events HTTP/1.1\r\nHost: x\r\n\r\n'],
    ['OPTIONS (a CORS preflight)', 'OPTIONS /events HTTP/1.1\r\nHost: x\r\n\r\n'],
    ['HTTP/1.0', 'GET /events?topics=a HTTP/1.0\r\n\r\n'],
    ['HTTP/2 prior knowledge', 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'],
    ['no Host', 'GET /events?topics=a HTTP/1.1\r\nAccept: */*\r\n\r\n'],
    ['a body by length', 'GET /events?topics=a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n'],
    ['a chunked body', 'GET /events?topics=a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'],
    ['an upgrade', 'GET /events?topics=a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n'],
    ['Expect', 'GET /events?topics=a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n'],
    ['a repeated header', 'GET /events?topics=a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n'],
    ['a repeated header in another case', 'GET /events?topics=a HTTP/1.1\r\nHost: x\r\nCookie: a=1\r\ncookie: b=2\r\n\r\n'],
    ['a folded header', 'GET /events?topics=a HTTP/1.1\r\nHost: x\r\nX-A: one\r\n two\r\n\r\n'],
    ['a header without a colon', 'GET /events?topics=a HTTP/1.1\r\nHost: x\r\nX-A\r\n\r\n'],
    ['a space before the colon', 'GET /events?topics=a HTTP/1.1\r\nHost : x\r\n\r\n'],
    ['a control character in a value', 'GET /events?topics=a HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n'],
    ['a bare LF', 'GET /events?topics=a HTTP/1.1\nHost: x\n\n'],
    ['an LF inside a line', 'GET /events?topics=a HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n'],
    ['an unfinished head', 'GET /events?topics=a HTTP/1.1\r\nHost: x\r\n'],
    ['a request pipelined after the head', `${PLAIN}GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n`],
    ['over 100 headers', `GET /events?topics=a HTTP/1.1\r\nHost: x\r\n${Array.from({ length: 100 }, (_, i) => `X-${i}: v\r\n`).join('')}\r\n`],
    ['a head over 16 KiB', `GET /events?topics=a HTTP/1.1\r\nHost: x\r\nX-Big: ${'b'.repeat(MAX_STREAM_HEAD_BYTES)}\r\n\r\n`],
    ['nothing but the blank line', '\r\n\r\n'],
  ];
  for (const [what, text] of declined) {
    it(`leaves to node:http: ${what}`, () => assert.equal(head(text), undefined));
  }
});

/** Records the URL of each request node:http's handlers get, and counts the server's connections. */
function watch(r: RunningRelay): { urls: string[]; connections: () => number } {
  const urls: string[] = [];
  let connections = 0;
  r.server.prependListener('request', (req) => urls.push(req.url ?? ''));
  r.server.on('connection', () => connections++);
  return { urls, connections: () => connections };
}

/** Sends one request and reads its whole answer. */
function call(base: string, method: string, path: string, body?: unknown): Promise<{ status: number; body: any }> {
  return new Promise((resolve, reject) => {
    const req = request(`${base}${path}`, { method, headers: body === undefined ? {} : { 'content-type': 'application/json' } }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (text += chunk));
      res.on('end', () => resolve({ status: res.statusCode!, body: text === '' ? undefined : JSON.parse(text) }));
    });
    req.on('error', reject);
    req.end(body === undefined ? undefined : JSON.stringify(body));
  });
}

describe('relay.serveStreamsFast', () => {
  it("serves stream requests itself; node:http's handlers get every other request, and the server's other 'connection' listeners hear every connection", async () => {
    const r = await startRelay({}, { fast: true });
    const seen = watch(r);
    try {
      const s = await SseReader.open(`${r.base}/events?topics=a`);
      await s.until(() => s.events.length >= 1, 5000, 'config');
      const sessionId: string = s.events[0]!.json.payload.session_id;
      const updated = await call(r.base, 'POST', '/update_subscriptions', { session_id: sessionId, add: ['b'] });
      assert.equal(updated.status, 200);
      await r.relay.publish('b', 'through the update');
      await s.until(() => s.events.some((e) => e.json.payload === 'through the update'), 5000, 'the message of the added topic');
      assert.deepEqual(seen.urls, ['/update_subscriptions'], 'the stream request never reached node:http');
      assert.equal(seen.connections(), 2);
    } finally {
      await r.close();
    }
  });

  it('leaves to node:http, byte for byte, a head split across packets and a second request on a keep-alive connection', async () => {
    const r = await startRelay({}, { fast: true });
    const seen = watch(r);
    try {
      const split = await RawClient.open(r, ['GET /events?topics=a HTTP/1.1\r\nHo', 'st: x\r\n\r\n']);
      await split.until(() => split.body.includes('/httpsub/config'), 'the config event');
      const kept = await RawClient.open(r, 'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n');
      await kept.until(() => kept.text.includes('"status":"ok"'), 'the health answer');
      kept.socket.write('GET /events?topics=a HTTP/1.1\r\nHost: x\r\n\r\n');
      await kept.until(() => kept.text.includes('/httpsub/config'), 'the config event on the same connection');
      await r.relay.publish('a', 'to both');
      await split.until(() => dechunk(split.body).data.includes('"payload":"to both"'), 'the message on the split one');
      await kept.until(() => kept.text.includes('"payload":"to both"'), 'the message on the kept one');
      assert.equal(r.relay.stats().connections.sse, 2);
      // The split head may or may not have arrived in one read: node:http saw it only if not.
      assert.ok(seen.urls.includes('/healthz') && seen.urls.includes('/events?topics=a'), `node:http saw ${seen.urls.join(' ')}`);
    } finally {
      await r.close();
    }
  });

  it("answers a refused stream as node:http's path does (status, JSON body, CORS), then closes the connection", async () => {
    const options = { limits: { maxConnectionsPerIp: 1 }, cors: { origins: '*' as const } };
    const fast = await startRelay(options, { fast: true });
    const plain = await startRelay(options);
    try {
      for (const [target, code] of [['/events?topics=a,,b', 'invalid-topic']] as const) {
        const request = `GET ${target} HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n\r\n`;
        const [a, b] = await Promise.all([RawClient.open(fast, request), RawClient.open(plain, request)]);
        await a.until(() => a.closed, `the refused stream's connection to close (${target})`);
        // node:http's own answer is chunked.
        await b.until(() => dechunk(b.body).complete, `the node:http answer (${target})`);
        assert.equal(a.head.split('\r\n')[0], b.head.split('\r\n')[0]);
        assert.equal(a.body, dechunk(b.body).data);
        assert.equal(JSON.parse(a.body).error.code, code);
        assert.equal(a.header('content-type'), b.header('content-type'));
        assert.equal(a.header('access-control-allow-origin'), '*');
        assert.equal(Number(a.header('content-length')), Buffer.byteLength(a.body));
        b.socket.destroy();
      }
      // Over the per-address cap (the stream is counted from the socket's address): 429.
      const first = await SseReader.open(`${fast.base}/events?topics=a`);
      await first.until(() => first.events.length >= 1, 5000, 'config');
      const over = await RawClient.open(fast, 'GET /events?topics=a HTTP/1.1\r\nHost: x\r\n\r\n');
      await over.until(() => over.closed, 'the connection over the cap to close');
      assert.match(over.head, /^HTTP\/1\.1 429 Too Many Requests\r\n/);
      assert.match(JSON.parse(over.body).error.message, /too many open streams from 127\.0\.0\.1/);
      first.close();
    } finally {
      await fast.close();
      await plain.close();
    }
  });

  it('cuts a connection that sends nothing once headersTimeout passes, closes one that ends without a byte, and shrugs off a client that resets before sending', async () => {
    const r = await startRelay({}, { fast: true });
    try {
      // server.closeAllConnections() cuts one that has sent nothing, as node:http's does.
      const accepted = new Promise<void>((resolve) => r.server.once('connection', () => resolve()));
      const cut = await RawClient.open(r, '');
      await accepted;
      r.server.closeAllConnections();
      await cut.until(() => cut.closed, 'closeAllConnections to cut the connection that sent nothing');
      // node's default headersTimeout is a minute: only the end itself can close this one in time.
      const ended = await RawClient.open(r, '');
      ended.socket.end();
      await ended.until(() => ended.closed, 'the connection that ended to be closed');
      r.server.headersTimeout = 1000;
      const silent = await RawClient.open(r, '');
      const reset = connect(Number(new URL(r.base).port), '127.0.0.1');
      await new Promise<void>((resolve) => reset.once('connect', resolve));
      reset.resetAndDestroy();
      await silent.until(() => silent.closed, 'the silent connection to be cut');
      assert.equal(silent.text, '');
      const s = await SseReader.open(`${r.base}/events?topics=a`);
      await s.until(() => s.events.length >= 1, 5000, 'a stream after both');
      s.close();
    } finally {
      await r.close();
    }
  });

  it("changes nothing on a server whose connections are not plain HTTP (HTTPS, HTTP/2), nor on a server that is not node's", async () => {
    const relay = await createRelay({ broker: `mem://fast-${process.pid}` });
    try {
      for (const server of [createHttpsServer(), createH2cServer()]) {
        const before = server.listeners('connection');
        assert.equal(relay.serveStreamsFast(server as never), false);
        assert.deepEqual(server.listeners('connection'), before);
      }
      const replaced = createHttpServer();
      replaced.removeAllListeners('connection');
      assert.equal(relay.serveStreamsFast(replaced), false);
    } finally {
      await relay.close();
    }
  });

  it('a shutdown that closes the server ends its streams, closes connections that sent nothing yet, and stops its sweep', async () => {
    const r = await startRelay({}, { fast: true });
    const waiter = new Waiter();
    const s = await SseReader.open(`${r.base}/events?topics=a`);
    await s.until(() => s.events.length >= 1, 5000, 'config');
    // Connected, nothing sent: node:http would close it as idle; the default headersTimeout is a minute.
    const silent = await RawClient.open(r, '');
    let closed = false;
    r.server.once('close', () => {
      closed = true;
      waiter.wake();
    });
    // Not awaited first: it resolves only once the server has closed, which is what is watched.
    const closing = r.close();
    await waiter.until(() => closed, 5000, () => new Error('the server did not close: a timer or socket held it'));
    await closing;
    await s.until(() => s.ended, 5000, 'the stream to end');
    await silent.until(() => silent.closed, 'the silent connection to be closed');
  });
});
