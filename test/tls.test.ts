/**
 * TLS and HTTP/2 on the server's main port (src/server/listen.ts), with a self-signed
 * certificate made here by openssl: SSE over HTTPS; over HTTP/2 many streams on one connection,
 * with client cancel and flow control (drain) working; HTTP/1.1 and WebSocket (wss) on the same
 * port; and with --workers 2, a resume landing on the other worker proxied to the owner.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { connect as connectH2, type ClientHttp2Session } from 'node:http2';
import { Agent, request } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { WebSocket } from 'ws';
import { ownerOf, WORKER_HEADER } from '../src/server/cluster.ts';
import { startServer, type RunningServer } from '../src/server/cli.ts';
import { silentLogger } from '../src/server/log.ts';
import type { ServerConfig } from '../src/server/args.ts';
import { ensureBuilt, LivepipeProcess } from './support/livepipe.ts';
import { openSse, openSseH2, type SseStream } from './support/sse-stream.ts';
import { Waiter } from './support/wait.ts';

let dir: string;
let cert: string;
let key: string;
let ca: Buffer;

function makeCertificate(name: string): { cert: string; key: string } {
  const files = { cert: join(dir, `${name}.crt`), key: join(dir, `${name}.key`) };
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '1',
    '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
    '-keyout', files.key, '-out', files.cert,
  ], { stdio: 'ignore' });
  return files;
}

before(() => {
  dir = mkdtempSync(join(tmpdir(), 'livepipe-tls-'));
  ({ cert, key } = makeCertificate('server'));
  ca = readFileSync(cert);
});
after(() => rmSync(dir, { recursive: true, force: true }));

let buses = 0;
function serve(extra: Partial<ServerConfig>): Promise<RunningServer> {
  return startServer({ host: '127.0.0.1', port: 0, broker: `mem://tls-${process.pid}-${buses++}`, tls: { cert, key }, ...extra }, silentLogger());
}

interface Reply {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
  httpVersion?: string;
}

/** One HTTPS (HTTP/1.1) request. */
function call(url: string, method = 'GET', body?: string, agent: Agent | false = false): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method, agent, ca }, (res) => {
      let text = '';
      res.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, text, httpVersion: res.httpVersion }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

/** One request as one more stream of an HTTP/2 session. */
function callH2(session: ClientHttp2Session, method: string, path: string, body?: string): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const stream = session.request({ ':method': method, ':path': path });
    let headers: Reply['headers'] = {};
    let text = '';
    stream.on('response', (h) => (headers = h as Reply['headers']));
    stream.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
    stream.on('end', () => resolve({ status: Number(headers[':status']), headers, text }));
    stream.on('error', reject);
    stream.end(body);
  });
}

describe('HTTPS', () => {
  let running: RunningServer;
  before(async () => {
    running = await serve({});
  });
  after(() => running.shutdown());

  it('streams SSE over HTTPS', async () => {
    assert.match(running.url, /^https:\/\/127\.0\.0\.1:\d+$/);
    const stream = await openSse(`${running.url}/events?topics=news`, { ca });
    try {
      assert.equal(stream.status, 200);
      await stream.until(() => stream.config !== undefined, 'the config event');
      assert.equal((await call(`${running.url}/publish?topic=news`, 'POST', 'over tls')).status, 204);
      await stream.until(() => stream.messages().some((m) => m.payload === 'over tls'), 'the message');
    } finally {
      stream.close();
    }
  });

  it('refuses to start with a certificate it cannot read, or a key that does not match it', async () => {
    await assert.rejects(serve({ tls: { cert: join(dir, 'missing.crt'), key } }), /cannot read the TLS certificate .*missing\.crt/);
    const other = makeCertificate('other');
    await assert.rejects(serve({ tls: { cert, key: other.key } }), /unusable TLS certificate/);
  });
});

describe('HTTP/2 over TLS (http2: true)', () => {
  let running: RunningServer;
  let session: ClientHttp2Session;
  before(async () => {
    // A small outbox, so that a stream that stops reading overflows it quickly.
    running = await serve({ http2: true, relay: { outbox: { maxMessages: 20 } } });
    session = connectH2(running.url, { ca });
  });
  after(async () => {
    session.close();
    await running.shutdown();
  });

  const sseConnections = () => running.relay.stats().connections.sse ?? 0;
  const waiter = new Waiter();
  const until = (predicate: () => boolean, what: string) => waiter.until(predicate, 5_000, () => new Error(`timed out waiting for ${what}`), 20);

  it('carries two SSE streams on one connection, both receiving messages, and notices when one is cancelled', async () => {
    const first = await openSseH2(session, '/events?topics=a');
    const second = await openSseH2(session, '/events?topics=a,b');
    try {
      for (const stream of [first, second]) {
        assert.equal(stream.status, 200);
        assert.equal(stream.headers['content-type'], 'text/event-stream; charset=utf-8');
        await stream.until(() => stream.config !== undefined, 'the config event');
      }
      const connections = await new Promise<number>((resolve, reject) => running.server.getConnections((err, n) => (err ? reject(err) : resolve(n))));
      assert.equal(connections, 1, 'one TCP connection for both streams');
      assert.equal((await callH2(session, 'POST', '/publish?topic=a', 'to both')).status, 204);
      for (const stream of [first, second]) await stream.until(() => stream.messages().some((m) => m.payload === 'to both'), 'the message on each stream');

      // Cancelling one stream (RST_STREAM) ends that connection on the relay; the other goes on.
      assert.equal(sseConnections(), 2);
      first.close();
      await until(() => sseConnections() === 1, 'the relay to notice the cancelled stream');
      await callH2(session, 'POST', '/publish?topic=b', 'still here');
      await second.until(() => second.messages().some((m) => m.payload === 'still here'), 'the message on the remaining stream');
    } finally {
      first.close();
      second.close();
    }
  });

  it('holds back a stream whose reader stopped (flow control), drops its oldest messages, and resumes writing on drain', async () => {
    const slow = await openSseH2(session, '/events?topics=flood');
    try {
      await slow.until(() => slow.config !== undefined, 'the config event');
      slow.pause();
      const body = 'x'.repeat(16 * 1024);
      // Far more than HTTP/2's 64 KiB stream window plus the 20-message outbox.
      for (let i = 0; i < 60; i++) await running.relay.publish('flood', `${i} ${body}`);
      await until(() => running.relay.stats().messagesDropped > 0, 'messages dropped for the stalled stream');
      slow.resume();
      await slow.until(() => slow.errors().some((e) => e.code === 'events-lost'), 'the events-lost event');
      await running.relay.publish('flood', 'after the flood');
      await slow.until(() => slow.messages().some((m) => m.payload === 'after the flood'), 'messages after the stream drained');
      assert.ok(slow.messages().length < 61, 'some messages were dropped, not buffered without bound');
    } finally {
      slow.close();
    }
  });

  it('answers a body over the limit with 413 and no HTTP/1-only Connection header', async () => {
    const warnings: Error[] = [];
    const warned = (warning: Error) => warnings.push(warning);
    process.on('warning', warned);
    try {
      const reply = await callH2(session, 'POST', '/update_subscriptions', 'x'.repeat(running.relay.core.options.maxBodyBytes + 1));
      assert.equal(reply.status, 413);
      assert.equal(JSON.parse(reply.text).error.code, 'too-large');
      await new Promise((resolve) => setImmediate(resolve));
      assert.deepEqual(warnings.map((w) => w.message), []);
    } finally {
      process.off('warning', warned);
    }
  });

  it('still serves HTTP/1.1 clients on the same port', async () => {
    const health = await call(`${running.url}/healthz`);
    assert.equal(health.status, 200);
    assert.equal(health.httpVersion, '1.1');
    const stream = await openSse(`${running.url}/events?topics=old`, { ca });
    try {
      await stream.until(() => stream.config !== undefined, 'the config event');
      await running.relay.publish('old', 'over http/1.1');
      await stream.until(() => stream.messages().some((m) => m.payload === 'over http/1.1'), 'the message');
    } finally {
      stream.close();
    }
  });

  it('accepts WebSocket (wss) on the same port', async () => {
    const ws = new WebSocket(`${running.url.replace('https:', 'wss:')}/ws?topics=sock`, { ca });
    const frames: any[] = [];
    ws.on('message', (data) => {
      frames.push(JSON.parse(String(data)));
      waiter.wake();
    });
    try {
      await until(() => frames.length > 0, 'the config frame');
      assert.equal(frames[0].topic, '/httpsub/config');
      await running.relay.publish('sock', 'over wss');
      await until(() => frames.some((f) => f.payload === 'over wss'), 'the message frame');
    } finally {
      ws.close();
    }
  });
});

describe('--workers 2 with TLS and HTTP/2', () => {
  let lp: LivepipeProcess;
  let base: string;
  const agents: Agent[] = [];
  const sessions: ClientHttp2Session[] = [];
  const streams: SseStream[] = [];

  before(async () => {
    ensureBuilt();
    lp = new LivepipeProcess(['--port', '0', '--workers', '2', '--tls-cert', cert, '--tls-key', key, '--http2']);
    const deadline = Date.now() + 10_000;
    let ready;
    while ((ready = lp.records().find((r) => r.msg.startsWith('2 workers serving '))) === undefined) {
      if (!lp.running || Date.now() > deadline) throw new Error(`did not start; stdout:\n${lp.stdout}\nstderr:\n${lp.stderr}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    base = ready.url;
  });
  after(async () => {
    for (const stream of streams) stream.close();
    for (const session of sessions) session.close();
    for (const agent of agents) agent.destroy();
    await lp.kill();
  });

  /** A stream that received one message, then closed: its owner and its Last-Event-ID. */
  /** A kept-alive connection that landed on the worker that does not own the session. */
  async function agentOnOtherWorker(owner: number | undefined): Promise<Agent> {
    for (let i = 0; i < 30; i++) {
      const candidate = new Agent({ keepAlive: true, maxSockets: 1, ca });
      agents.push(candidate);
      if (Number((await call(`${base}/healthz`, 'GET', undefined, candidate)).headers[WORKER_HEADER]) !== owner) return candidate;
    }
    assert.fail('no connection landed on the other worker');
  }

  async function brokenStream(topic: string): Promise<{ owner: number; sessionId: string; lastEventId: string }> {
    const stream = await openSse(`${base}/events?topics=${topic}`, { ca, agent: false });
    await stream.until(() => stream.config !== undefined, 'the config event');
    await call(`${base}/publish?topic=${topic}`, 'POST', 'before');
    await stream.until(() => stream.messages().length === 1, 'the first message');
    stream.close();
    await call(`${base}/publish?topic=${topic}`, 'POST', 'missed');
    return { owner: Number(stream.headers[WORKER_HEADER]), sessionId: stream.config.session_id, lastEventId: stream.lastId! };
  }

  async function checkResumed(stream: SseStream, owner: number, sessionId: string): Promise<void> {
    streams.push(stream);
    assert.equal(stream.status, 200);
    assert.equal(Number(stream.headers[WORKER_HEADER]), owner, 'the owner answers');
    await stream.until(() => stream.messages().length > 0, 'the replay');
    assert.equal(stream.config.session_id, sessionId);
    assert.equal(stream.config.resumed, true);
    assert.equal(stream.messages()[0].payload, 'missed');
  }

  it('resumes over HTTPS (HTTP/1.1) on the other worker: proxied to the owner, which replays', async () => {
    const { owner, sessionId, lastEventId } = await brokenStream('h1');
    const agent = await agentOnOtherWorker(owner);
    const resumed = await openSse(`${base}/events`, { ca, agent, headers: { 'last-event-id': lastEventId } });
    assert.equal(resumed.reusedSocket, true);
    await checkResumed(resumed, owner, sessionId);

    // Live messages flow through the proxy, and closing the client's stream closes the owner's.
    await call(`${base}/publish?topic=h1`, 'POST', 'live');
    await resumed.until(() => resumed.messages().some((m) => m.payload === 'live'), 'a live message');
    const sse = async () => Number(/^livepipe_connections\{transport="sse"\} (\d+)$/m.exec((await call(`${base}/metrics`)).text)?.[1]);
    assert.equal(await sse(), 1);
    resumed.close();
    const deadline = Date.now() + 5_000;
    while ((await sse()) !== 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(await sse(), 0);
  });

  it('resumes a WebSocket (wss) on the other worker', async () => {
    const frames: any[] = [];
    const waiter = new Waiter();
    const until = (predicate: () => boolean, what: string) => waiter.until(predicate, 5_000, () => new Error(`timed out waiting for ${what}: ${JSON.stringify(frames)}`));
    const connect = (query: string, agent?: Agent) => {
      const ws = new WebSocket(`${base.replace('https:', 'wss:')}/ws?${query}`, { ca, ...(agent === undefined ? {} : { agent }) });
      ws.on('message', (data) => {
        frames.push(JSON.parse(String(data)));
        waiter.wake();
      });
      return ws;
    };
    const first = connect('topics=sock');
    await until(() => frames.length === 1, 'the config frame');
    const sessionId = frames[0].payload.session_id;
    await call(`${base}/publish?topic=sock`, 'POST', 'before');
    await until(() => frames.length === 2, 'a message');
    const lastEventId: string = frames[1].id;
    first.terminate();
    await call(`${base}/publish?topic=sock`, 'POST', 'missed');

    const owner = ownerOf(sessionId);
    const agent = await agentOnOtherWorker(owner);
    let opened = 0;
    const create = agent.createConnection.bind(agent);
    agent.createConnection = (...args: Parameters<Agent['createConnection']>) => {
      opened++;
      return create(...args);
    };
    frames.length = 0;
    const second = connect(`last_event_id=${encodeURIComponent(lastEventId)}`, agent);
    try {
      await until(() => frames.length === 2, 'the config frame and the replay');
      assert.equal(opened, 0, 'the upgrade went on the connection to the other worker');
      assert.equal(frames[0].payload.session_id, sessionId);
      assert.equal(frames[0].payload.resumed, true);
      assert.equal(frames[1].payload, 'missed');
    } finally {
      second.terminate();
    }
  });

  it('resumes over HTTP/2 on the other worker', async () => {
    const { owner, sessionId, lastEventId } = await brokenStream('h2');
    let session: ClientHttp2Session | undefined;
    for (let i = 0; i < 30 && session === undefined; i++) {
      const candidate = connectH2(base, { ca });
      sessions.push(candidate);
      if (Number((await callH2(candidate, 'GET', '/healthz')).headers[WORKER_HEADER]) !== owner) session = candidate;
    }
    assert.ok(session, 'an HTTP/2 connection to the other worker');
    await checkResumed(await openSseH2(session, '/events', { 'last-event-id': lastEventId }), owner, sessionId);
  });
});
