/**
 * `livepipe --workers 2` (src/server/cluster.ts), run as the built bin: two worker processes on
 * one port, sessions that work whichever worker a request lands on. Each response names the
 * worker that answered (X-Livepipe-Worker), so a test can prove where a request landed; a
 * request sent on a kept-alive connection lands on the worker that answered the one before.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { Agent, request } from 'node:http';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SignJWT } from 'jose';
import { WebSocket } from 'ws';
import { ownerOf, WORKER_HEADER } from '../src/server/cluster.ts';
import { ensureBuilt, LivepipeProcess, within, type LogRecord } from './support/livepipe.ts';
import { openSse, type SseStream } from './support/sse-stream.ts';
import { Waiter } from './support/wait.ts';

interface Reply {
  status: number;
  worker: number;
  json: any;
  text: string;
}

/** One request; on a new connection unless an agent is given. */
function call(base: string, method: string, path: string, body?: unknown, agent: Agent | false = false, headers: Record<string, string> = {}): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body);
    const req = request(`${base}${path}`, { method, agent, headers: { ...(data === undefined ? {} : { 'content-type': 'application/json' }), ...headers } }, (res) => {
      let text = '';
      res.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
      res.on('end', () => {
        let json: any;
        try {
          json = JSON.parse(text);
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode ?? 0, worker: Number(res.headers[WORKER_HEADER]), json, text });
      });
    });
    req.on('error', reject);
    req.end(data);
  });
}

/** Repeats `attempt` (each on a new connection) until it lands on a worker other than `not`. */
async function onOtherWorker(not: number, attempt: (i: number) => Promise<Reply>): Promise<Reply> {
  for (let i = 0; i < 30; i++) {
    const reply = await attempt(i);
    if (reply.worker !== not) return reply;
  }
  throw new Error(`30 requests all landed on worker ${not}`);
}

/** A kept-alive connection on which `worker` answered: the next request on it lands there too. */
async function connectionTo(base: string, worker: number): Promise<Agent> {
  for (let i = 0; i < 30; i++) {
    const agent = new Agent({ keepAlive: true, maxSockets: 1 });
    if ((await call(base, 'GET', '/healthz', undefined, agent)).worker === worker) return agent;
    agent.destroy();
  }
  throw new Error(`no connection reached worker ${worker}`);
}

/** Counts the connections `agent` opens from now on (none: a request went on the one it had). */
function newConnections(agent: Agent): () => number {
  let count = 0;
  const create = agent.createConnection.bind(agent);
  agent.createConnection = (...args: Parameters<Agent['createConnection']>) => {
    count++;
    return create(...args);
  };
  return () => count;
}

/** A WebSocket client keeping every frame it got. */
class WsClient {
  readonly frames: any[] = [];
  readonly ws: WebSocket;
  private readonly waiter = new Waiter();
  constructor(url: string, agent?: Agent) {
    this.ws = new WebSocket(url, agent === undefined ? {} : { agent });
    this.ws.on('message', (data) => {
      this.frames.push(JSON.parse(String(data)));
      this.waiter.wake();
    });
  }
  messages(): any[] {
    return this.frames.filter((f) => f.topic !== undefined && f.topic !== '/httpsub/config');
  }
  until(predicate: () => boolean, what: string): Promise<void> {
    return this.waiter.until(predicate, 5_000, () => new Error(`timed out waiting for ${what}; frames: ${JSON.stringify(this.frames)}`));
  }
}

async function waitFor<T>(lp: LivepipeProcess, find: (records: LogRecord[]) => T | undefined, what: string, ms = 10_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const found = find(lp.records());
    if (found !== undefined) return found;
    if (!lp.running || Date.now() > deadline) throw new Error(`no ${what}; stdout:\n${lp.stdout}\nstderr:\n${lp.stderr}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** One open stream on each worker, keyed by worker id. */
async function streamOnEachWorker(base: string, topics: string): Promise<Map<number, SseStream>> {
  const streams = new Map<number, SseStream>();
  for (let i = 0; i < 30 && streams.size < 2; i++) {
    const stream = await openSse(`${base}/events?topics=${topics}`, { agent: false });
    await stream.until(() => stream.config !== undefined, 'the config event');
    const worker = Number(stream.headers[WORKER_HEADER]);
    if (streams.has(worker)) stream.close();
    else streams.set(worker, stream);
  }
  assert.equal(streams.size, 2, 'streams on both workers');
  return streams;
}

describe('livepipe --workers 2', () => {
  let lp: LivepipeProcess;
  let base: string;
  let workers: Array<{ id: number; pid: number }>;
  let streams: Map<number, SseStream>;
  const open: SseStream[] = [];
  const agents: Agent[] = [];

  before(async () => {
    ensureBuilt();
    lp = new LivepipeProcess(['--port', '0', '--workers', '2', '--log-level', 'info']);
    const ready = await waitFor(lp, (records) => records.find((r) => r.msg.startsWith('2 workers serving ')), 'record of both workers serving');
    base = ready.url;
    workers = ready.workers;
    streams = await streamOnEachWorker(base, 'all');
    open.push(...streams.values());
  });
  after(async () => {
    for (const stream of open) stream.close();
    for (const agent of agents) agent.destroy();
    await lp.kill();
  });

  it('runs two worker processes on one port, each naming itself in the sessions it opens', () => {
    assert.match(base, /^http:\/\/127\.0\.0\.1:\d+$/);
    assert.equal(workers.length, 2);
    assert.equal(new Set(workers.map((w) => w.pid)).size, 2);
    for (const [worker, stream] of streams) {
      assert.equal(ownerOf(stream.config.session_id), worker);
      assert.equal(stream.config.session_id.length, 24); // 2 bytes of worker id + 128 random bits
    }
  });

  it('delivers a message published once to the streams of both workers', async () => {
    const published = await call(base, 'POST', '/publish?topic=all', 'to everyone');
    assert.equal(published.status, 204);
    for (const stream of streams.values()) {
      await stream.until(() => stream.messages().some((m) => m.payload === 'to everyone'), 'the message on both workers');
    }
  });

  it('applies an update that lands on the other worker to the stream, and answers with the result', async () => {
    const [owner, stream] = [...streams][0]!;
    const sessionId = stream.config.session_id;
    const reply = await onOtherWorker(owner, (i) => call(base, 'POST', '/update_subscriptions', { session_id: sessionId, add: [`moved-${i}`], remove: [] }));
    assert.equal(reply.status, 200, reply.text);
    const added = reply.json.subscriptions.find((t: string) => t.startsWith('moved-'));
    assert.deepEqual(reply.json, { session_id: sessionId, subscriptions: ['all', added], failed: [] });
    // The owner's stream follows: it now gets the topic added through the other worker.
    await call(base, 'POST', `/publish?topic=${added}`, 'after the update');
    await stream.until(() => stream.messages().some((m) => m.topic === added && m.payload === 'after the update'), 'the message of the added topic');

    // And a removal through the other worker is the owner's too.
    const removed = await onOtherWorker(owner, () => call(base, 'POST', '/update_subscriptions', { session_id: sessionId, add: [], remove: [added] }));
    assert.deepEqual(removed.json.subscriptions, ['all']);
  });

  it('resumes a stream on the other worker with its session, replaying what it missed', async () => {
    const [owner, stream] = [...streams][1]!;
    const other = workers.find((w) => w.id !== owner)!.id;
    await call(base, 'POST', '/publish?topic=all', 'before the break');
    await stream.until(() => stream.messages().some((m) => m.payload === 'before the break'), 'a message before the break');
    const lastEventId = stream.lastId!;
    stream.close();
    await call(base, 'POST', '/publish?topic=all', 'missed');

    // Sent on a connection that the other worker serves: that worker receives the request.
    // (Destroying the agent would cut the stream on its connection: it goes when the test ends.)
    const agent = await connectionTo(base, other);
    agents.push(agent);
    {
      const resumed = await openSse(`${base}/events?topics=all`, { agent, headers: { 'last-event-id': lastEventId } });
      open.push(resumed);
      assert.equal(resumed.reusedSocket, true);
      assert.equal(resumed.status, 200);
      assert.equal(Number(resumed.headers[WORKER_HEADER]), owner, 'the owner answers');
      await resumed.until(() => resumed.messages().length > 0, 'the replay');
      assert.equal(resumed.config.session_id, stream.config.session_id);
      assert.equal(resumed.config.resumed, true);
      assert.equal(resumed.messages()[0].payload, 'missed');
      await call(base, 'POST', '/publish?topic=all', 'live again');
      await resumed.until(() => resumed.messages().some((m) => m.payload === 'live again'), 'live messages after the resume');
      streams.set(owner, resumed);
    }
  });

  it('resumes on a new connection at the owner, whichever worker the connection reaches', async () => {
    const [owner, stream] = [...streams][0]!;
    let current = stream;
    // The primary hands new connections to the workers in turn: of four, two reach the other
    // worker, which leaves the request to node:http, and that hands it to the owner.
    for (let i = 0; i < 4; i++) {
      // The stream has everything published so far (earlier tests' messages too) before it drops.
      await call(base, 'POST', '/publish?topic=all', `before ${i}`);
      await current.until(() => current.messages().some((m) => m.payload === `before ${i}`), `before ${i}`);
      const lastEventId = current.lastId!;
      current.close();
      await call(base, 'POST', '/publish?topic=all', `gap ${i}`);
      const resumed = await openSse(`${base}/events?topics=all`, { agent: false, headers: { 'last-event-id': lastEventId } });
      open.push(resumed);
      assert.equal(resumed.status, 200);
      assert.equal(Number(resumed.headers[WORKER_HEADER]), owner, 'the owner answers');
      await resumed.until(() => resumed.messages().length > 0, `the replay of gap ${i}`);
      assert.equal(resumed.config.session_id, stream.config.session_id);
      assert.equal(resumed.config.resumed, true);
      assert.deepEqual(resumed.messages().map((m) => m.payload), [`gap ${i}`]);
      current = resumed;
    }
    streams.set(owner, current);
  });

  it('resumes a WebSocket on the other worker with its session, replaying what it missed', async () => {
    const first = new WsClient(`${base.replace('http:', 'ws:')}/ws?topics=sock`);
    await first.until(() => first.frames.length > 0, 'the config frame');
    const sessionId = first.frames[0].payload.session_id;
    const owner = ownerOf(sessionId)!;
    await call(base, 'POST', '/publish?topic=sock', 'before the break');
    await first.until(() => first.messages().length === 1, 'a message before the break');
    const lastEventId = first.messages()[0].id;
    first.ws.terminate();
    await call(base, 'POST', '/publish?topic=sock', 'missed');

    const agent = await connectionTo(base, workers.find((w) => w.id !== owner)!.id);
    agents.push(agent);
    const opened = newConnections(agent);
    const second = new WsClient(`${base.replace('http:', 'ws:')}/ws?last_event_id=${encodeURIComponent(lastEventId)}`, agent);
    try {
      await second.until(() => second.messages().length > 0, 'the replay');
      assert.equal(opened(), 0, 'the upgrade went on the connection to the other worker');
      assert.equal(second.frames[0].payload.session_id, sessionId);
      assert.equal(second.frames[0].payload.resumed, true);
      assert.equal(second.messages()[0].payload, 'missed');
    } finally {
      second.ws.terminate();
    }
  });

  it('aggregates /metrics over both workers', async () => {
    // One stream on each worker is open now (the earlier ones were replaced or closed).
    const connections = async () => Number(/^livepipe_connections\{transport="sse"\} (\d+)$/m.exec((await call(base, 'GET', '/metrics')).text)?.[1]);
    const deadline = Date.now() + 5_000;
    while ((await connections()) !== 2 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
    // Either worker answers with the sum; each holds only one.
    for (let i = 0; i < 4; i++) assert.equal(await connections(), 2);
    const metrics = await call(base, 'GET', '/metrics');
    assert.equal(metrics.status, 200);
    assert.match(metrics.text, /^livepipe_messages_out_total \d+$/m);
  });

  it('replaces a worker that dies; its sessions are gone, the other worker keeps serving', async () => {
    const [victim, stream] = [...streams][0]!;
    const survivor = streams.get(workers.find((w) => w.id !== victim)!.id)!;
    const sessionId = stream.config.session_id;
    const lastEventId = stream.lastId!;
    process.kill(workers.find((w) => w.id === victim)!.pid, 'SIGKILL');
    await waitFor(lp, (records) => records.find((r) => r.msg.includes('exited (SIGKILL); starting another')), 'restart record');
    await waitFor(lp, (records) => (records.filter((r) => r.msg.startsWith('livepipe listening on ')).length === 3 ? true : undefined), 'the new worker');

    for (let i = 0; i < 2; i++) {
      const update = await call(base, 'POST', '/update_subscriptions', { session_id: sessionId, add: ['x'], remove: [] });
      assert.equal(update.status, 404);
      assert.equal(update.json.error.code, 'unknown-session');
    }
    const again = await openSse(`${base}/events?topics=all`, { agent: false, headers: { 'last-event-id': lastEventId } });
    open.push(again);
    await again.until(() => again.config !== undefined, 'the config event');
    assert.equal(again.config.resumed, false);
    assert.notEqual(again.config.session_id, sessionId);
    assert.deepEqual(again.config.subscriptions, ['all']);

    await call(base, 'POST', '/publish?topic=all', 'after the crash');
    for (const s of [survivor, again]) await s.until(() => s.messages().some((m) => m.payload === 'after the crash'), 'messages after the crash');
  });

  it('stops every worker on SIGTERM, ending their streams, and exits 0', async () => {
    const live = await streamOnEachWorker(base, 'all');
    open.push(...live.values());
    const exit = await lp.stop('SIGTERM');
    assert.deepEqual(exit, { code: 0, signal: null });
    for (const stream of live.values()) await stream.until(() => stream.ended, 'the stream to end');
    assert.equal(lp.records().filter((r) => r.msg === 'livepipe stopped').length, 2);
  });
});

describe('livepipe --workers 2 when workers fail', () => {
  before(() => ensureBuilt());

  it('exits 1 when the workers cannot start (the port is taken)', async () => {
    const blocker = createServer();
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve));
    const lp = new LivepipeProcess(['--port', String((blocker.address() as AddressInfo).port), '--workers', '2']);
    try {
      const exit = await within(lp.exited, 10_000, 'livepipe to exit');
      assert.deepEqual(exit, { code: 1, signal: null });
      assert.ok(lp.records().some((r) => r.level === 'fatal' && r.msg.startsWith('cannot listen on ')), lp.stdout);
    } finally {
      await lp.kill();
      blocker.close();
    }
  });

  it('restarts a worker that dies, but gives up with exit 1 after 5 restarts within a minute', async () => {
    const lp = new LivepipeProcess(['--port', '0', '--workers', '2']);
    try {
      await waitFor(lp, (records) => records.find((r) => r.msg.startsWith('2 workers serving ')), 'record of both workers serving');
      // Kill the newest worker each time, once its replacement serves.
      const killed = new Set<number>();
      while (lp.running) {
        const newest = lp.records().findLast((r) => r.msg.startsWith('livepipe listening on '))!.pid as number;
        if (!killed.has(newest)) {
          killed.add(newest);
          process.kill(newest, 'SIGKILL');
        }
        await Promise.race([lp.exited, new Promise((resolve) => setTimeout(resolve, 20))]);
      }
      assert.deepEqual(await lp.exited, { code: 1, signal: null });
      assert.equal(killed.size, 6);
      assert.equal(lp.records().filter((r) => r.msg.endsWith('starting another')).length, 5);
    } finally {
      await lp.kill();
    }
  });
});

describe('livepipe --workers 2 with authorization', () => {
  const secret = 'cluster-test-secret-that-is-long-enough';
  const bearer = async (sub: string) =>
    `Bearer ${await new SignJWT({ livepipe: { subscribe: ['*'], publish: ['*'] } }).setProtectedHeader({ alg: 'HS256' }).setSubject(sub).setExpirationTime('5m').sign(new TextEncoder().encode(secret))}`;
  let dir: string;
  let lp: LivepipeProcess;
  let base: string;
  before(async () => {
    ensureBuilt();
    dir = mkdtempSync(join(tmpdir(), 'livepipe-cluster-'));
    writeFileSync(join(dir, 'livepipe.yaml'), `auth:\n  jwt:\n    secret: ${secret}\n`);
    lp = new LivepipeProcess(['--config', join(dir, 'livepipe.yaml'), '--port', '0', '--workers', '2']);
    base = (await waitFor(lp, (records) => records.find((r) => r.msg.startsWith('2 workers serving ')), 'record of both workers serving')).url;
  });
  after(async () => {
    await lp.kill();
    rmSync(dir, { recursive: true, force: true });
  });

  it("checks an update landing on the other worker against the session's identity, at the owner", async () => {
    const alice = await bearer('alice');
    const stream = await openSse(`${base}/events?topics=a`, { agent: false, headers: { authorization: alice } });
    try {
      await stream.until(() => stream.config !== undefined, 'the config event');
      const owner = Number(stream.headers[WORKER_HEADER]);
      const update = (authorization: string) => (i: number) =>
        call(base, 'POST', '/update_subscriptions', { session_id: stream.config.session_id, add: [`t${i}`], remove: [] }, false, { authorization });
      const bob = await onOtherWorker(owner, update(await bearer('bob')));
      assert.equal(bob.status, 403, bob.text);
      assert.equal(bob.json.error.code, 'forbidden');
      const own = await onOtherWorker(owner, update(alice));
      assert.equal(own.status, 200, own.text);
      assert.equal(own.json.session_id, stream.config.session_id);
      assert.ok(own.json.subscriptions.includes('a'));
    } finally {
      stream.close();
    }
  });
});
