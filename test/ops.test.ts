/**
 * Operations: JSON logs with levels, the metrics operators alert on, OpenTelemetry traces, and
 * a graceful shutdown that tells clients to reconnect elsewhere within a deadline.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import { createServer as createNetServer, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { gunzipSync } from 'node:zlib';
import { WebSocket } from 'ws';
import { MemBroker, type RelayTracer, type SpanAttributes } from '../src/index.ts';
import { QueuedConnection } from '../src/connection.ts';
import { sessionFingerprint } from '../src/tracer.ts';
import { tracesUrl } from '../src/server/tracing.ts';
import { ensureBuilt, LivepipeProcess, parseRecords, ROOT, type LogRecord } from './support/livepipe.ts';
import { post, SseReader, startRelay, type RunningRelay } from './support/relay.ts';
import { Waiter } from './support/wait.ts';

const uniqueBus = (name: string) => `${name}-${process.pid}-${Math.random()}`;

/** A relay whose server also takes WebSocket upgrades, as the CLI's does. */
async function startWsRelay(options: Parameters<typeof startRelay>[0] = {}): Promise<RunningRelay> {
  const r = await startRelay(options);
  r.server.on('upgrade', (req, socket, head) => {
    if (!r.relay.handleUpgrade(req, socket, head)) socket.destroy();
  });
  return r;
}

/** A `ws` client: its frames, and how it was closed. */
class WsClient {
  readonly frames: any[] = [];
  readonly socket: WebSocket;
  closed: { code: number; reason: string } | undefined;
  private readonly waiter = new Waiter();

  constructor(socket: WebSocket) {
    this.socket = socket;
    socket.on('message', (data) => {
      this.frames.push(JSON.parse(data.toString()));
      this.wake();
    });
    socket.on('close', (code, reason) => {
      this.closed = { code, reason: reason.toString() };
      this.wake();
    });
    socket.on('error', () => {});
  }

  static async open(url: string): Promise<WsClient> {
    const client = new WsClient(new WebSocket(url));
    await client.until(() => client.frames.length >= 1 || client.closed !== undefined, 'the config frame');
    return client;
  }

  until(predicate: () => boolean, what: string, ms = 5000): Promise<void> {
    return this.waiter.until(predicate, ms, () => new Error(`timed out waiting for ${what}; frames: ${JSON.stringify(this.frames)}`), 50);
  }

  private wake(): void {
    this.waiter.wake();
  }
}

/** One sample's value from Prometheus text, e.g. sample(text, 'livepipe_connections{transport="ws"}'). */
function sample(text: string, series: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

async function until(predicate: () => boolean | Promise<boolean>, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe('metrics', () => {
  it('counts broker reconnects, one per topic subscription that recovers from an outage', async () => {
    const broker = new MemBroker(uniqueBus('reconnects'));
    const r = await startRelay({ broker });
    const reader = await SseReader.open(`${r.base}/events?topics=a,b`);
    try {
      await reader.until(() => reader.events.length >= 1, 5000, 'the config event');
      const before = await r.relay.metrics.metrics();
      assert.equal(sample(before, 'livepipe_broker_reconnects_total'), 0);

      broker.beginOutage();
      assert.equal(sample(await r.relay.metrics.metrics(), 'livepipe_broker_reconnects_total'), 0, 'an outage alone is not a reconnect');
      broker.endOutage();
      const after = await r.relay.metrics.metrics();
      assert.equal(sample(after, 'livepipe_broker_reconnects_total'), 2);
      assert.equal(sample(after, 'livepipe_broker_errors_total'), 2);
      assert.equal(r.relay.stats().brokerReconnects, 2);
    } finally {
      reader.close();
      await r.close();
      await broker.close();
    }
  });

  it('observes update_subscriptions latency in a histogram, by outcome', async () => {
    const r = await startRelay();
    const reader = await SseReader.open(`${r.base}/events?topics=a`);
    try {
      await reader.until(() => reader.config !== undefined, 5000, 'the config event');
      const sessionId = reader.config.session_id as string;
      const empty = await r.relay.metrics.metrics();
      assert.equal(sample(empty, 'livepipe_update_duration_seconds_count{outcome="ok"}'), undefined, 'no observation before any update');

      assert.equal((await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sessionId, add: ['b', 'c'], remove: ['a'] }))).status, 200);
      assert.equal((await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sessionId, add: ['d'], remove: [] }))).status, 200);
      assert.equal((await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: 'no-such-session', add: ['d'], remove: [] }))).status, 404);
      const text = await r.relay.metrics.metrics();
      assert.equal(sample(text, 'livepipe_update_duration_seconds_count{outcome="ok"}'), 2);
      assert.equal(sample(text, 'livepipe_update_duration_seconds_count{outcome="error"}'), 1);
      assert.equal(sample(text, 'livepipe_update_duration_seconds_bucket{le="+Inf",outcome="ok"}'), 2);
      const sum = sample(text, 'livepipe_update_duration_seconds_sum{outcome="ok"}')!;
      assert.ok(sum > 0, `the sum of observed durations is ${sum}`);
    } finally {
      reader.close();
      await r.close();
    }
  });

  it('reports open connections by transport, sse and ws', async () => {
    const r = await startWsRelay();
    const ws = `${r.base.replace('http:', 'ws:')}/ws`;
    const readers: SseReader[] = [];
    const sockets: WsClient[] = [];
    const open = async () => {
      const text = await r.relay.metrics.metrics();
      return [sample(text, 'livepipe_connections{transport="sse"}'), sample(text, 'livepipe_connections{transport="ws"}')];
    };
    try {
      assert.deepEqual(await open(), [0, 0]);
      readers.push(await SseReader.open(`${r.base}/events?topics=a`));
      sockets.push(await WsClient.open(`${ws}?topics=a`), await WsClient.open(`${ws}?topics=b`));
      await readers[0]!.until(() => readers[0]!.events.length >= 1, 5000, 'the config event');
      assert.deepEqual(await open(), [1, 2]);
      sockets[0]!.socket.close();
      await sockets[0]!.until(() => sockets[0]!.closed !== undefined, 'the close');
      await until(async () => (await open())[1] === 1, 'the ws gauge to drop to 1');
      readers[0]!.close();
      await until(async () => (await open())[0] === 0, 'the sse gauge to drop to 0');
      assert.deepEqual(await open(), [0, 1]);
    } finally {
      for (const reader of readers) reader.close();
      for (const client of sockets) client.socket.terminate();
      await r.close();
    }
  });

  it('drops a transport to 0 once its last connection closes, whatever the transport', async () => {
    // A transport of its own stands in for the RPC ones (connect, grpc, grpc-web), which report the same way.
    class Probe extends QueuedConnection {
      readonly transport = 'probe';
      open(): void {}
      protected heartbeat(): boolean {
        return true;
      }
      protected writeBatch(): boolean {
        return true;
      }
      protected end(): void {}
    }
    const r = await startRelay();
    try {
      const { core } = r.relay;
      const probe = await core.openStream({ topics: 'a', sessionId: null, lastEventId: null }, () => new Probe(core.options.outbox, core.deliveries));
      assert.equal(sample(await r.relay.metrics.metrics(), 'livepipe_connections{transport="probe"}'), 1);
      probe.close();
      assert.equal(sample(await r.relay.metrics.metrics(), 'livepipe_connections{transport="probe"}'), 0);
    } finally {
      await r.close();
    }
  });
});

describe('relay.close({ reconnectDelayMs })', () => {
  it('tells every SSE stream to reconnect within the delay, then ends it cleanly', async () => {
    const r = await startRelay({ retryMs: 5000 });
    const readers = await Promise.all([1, 2, 3].map(() => SseReader.open(`${r.base}/events?topics=news`)));
    try {
      for (const reader of readers) await reader.until(() => reader.events.length >= 1, 5000, 'the config event');
      for (const reader of readers) assert.equal(reader.retry, 5000);
      await r.relay.close({ reconnectDelayMs: 50 });
      for (const reader of readers) {
        await reader.until(() => reader.ended, 5000, 'the end of the stream');
        assert.ok(reader.response.complete, 'the response was ended, not cut off');
        assert.match(reader.raw, /\nretry: \d+\n\n$/, 'a retry line is the last thing sent');
        assert.ok(reader.retry! >= 0 && reader.retry! <= 50, `retry ${reader.retry} is within 0..50`);
      }
    } finally {
      for (const reader of readers) reader.close();
      await r.close();
    }
  });

  it('sends queued messages before the retry line', async () => {
    const r = await startRelay();
    const reader = await SseReader.open(`${r.base}/events?topics=news`);
    try {
      await reader.until(() => reader.events.length >= 1, 5000, 'the config event');
      // Published and closed in the same turn: the message is still queued when the relay closes.
      await r.relay.publish('news', 'last words');
      await r.relay.close({ reconnectDelayMs: 0 });
      await reader.until(() => reader.ended, 5000, 'the end of the stream');
      assert.deepEqual(reader.messages().map((e) => e.json.payload), ['last words']);
      assert.match(reader.raw, /"payload":"last words"\}\n\nretry: 0\n\n$/);
    } finally {
      reader.close();
      await r.close();
    }
  });

  it('without a delay, ends streams without a retry line (clients keep their usual delay)', async () => {
    const r = await startRelay();
    const reader = await SseReader.open(`${r.base}/events?topics=news`);
    try {
      await reader.until(() => reader.events.length >= 1, 5000, 'the config event');
      await r.relay.close();
      await reader.until(() => reader.ended, 5000, 'the end of the stream');
      assert.equal(reader.raw.match(/^retry:/gm)?.length, 1, 'only the first bytes carry a retry line');
    } finally {
      reader.close();
      await r.close();
    }
  });
});

/** A tracer of the shape the relay takes, recording spans in memory. */
function recordingTracer() {
  const spans: Array<{ name: string; kind: number | undefined; attributes: SpanAttributes; status: { code: number; message?: string } | undefined; ended: boolean }> = [];
  const tracer: RelayTracer = {
    startSpan(name, options) {
      const span = { name, kind: options?.kind, attributes: { ...options?.attributes }, status: undefined as { code: number; message?: string } | undefined, ended: false };
      spans.push(span);
      return {
        setAttributes: (attributes) => Object.assign(span.attributes, attributes),
        setStatus: (status) => (span.status = status),
        end: () => (span.ended = true),
      };
    },
  };
  return { tracer, spans };
}

describe('tracing (the tracer option)', () => {
  it('spans stream opens, updates and publishes, with counts and a session fingerprint, never per delivered message', async () => {
    const { tracer, spans } = recordingTracer();
    const r = await startWsRelay({ tracer });
    const readers: SseReader[] = [];
    let ws: WsClient | undefined;
    try {
      readers.push(await SseReader.open(`${r.base}/events?topics=a,b`), await SseReader.open(`${r.base}/events?topics=a`));
      for (const reader of readers) await reader.until(() => reader.events.length >= 1, 5000, 'the config event');
      ws = await WsClient.open(`${r.base.replace('http:', 'ws:')}/ws?topics=a`);
      const sessionId = readers[0]!.config.session_id as string;
      assert.equal((await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sessionId, add: ['c', 'd'], remove: ['a'] }))).status, 200);
      assert.equal((await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: 'gone', add: ['c'], remove: [] }))).status, 404);
      assert.equal((await post(`${r.base}/publish?topic=a`, 'hello', {})).status, 204);
      await readers[1]!.until(() => readers[1]!.messages().length === 1, 5000, 'the message');
      await ws.until(() => ws!.frames.length === 2, 'the message on ws');

      assert.ok(spans.every((s) => s.ended));
      assert.deepEqual(spans.map((s) => s.name), [
        'livepipe.stream.open',
        'livepipe.stream.open',
        'livepipe.stream.open',
        'livepipe.update_subscriptions',
        'livepipe.update_subscriptions',
        'livepipe.publish', // one, though two clients got the message
      ]);
      const [open, , wsOpen, update, refused, publish] = spans;
      assert.deepEqual(open!.attributes, { 'livepipe.session': sessionFingerprint(sessionId), 'livepipe.transport': 'sse', 'livepipe.resumed': false, 'livepipe.topics.count': 2 });
      assert.match(String(open!.attributes['livepipe.session']), /^[0-9a-f]{16}$/);
      assert.equal(wsOpen!.attributes['livepipe.transport'], 'ws');
      assert.deepEqual(update!.attributes, { 'livepipe.topics.add': 2, 'livepipe.topics.remove': 1, 'livepipe.topics.count': 3, 'livepipe.topics.failed': 0 });
      // A refused request is recorded by its code; it is not an error of the relay.
      assert.equal(refused!.attributes['livepipe.error.code'], 'unknown-session');
      assert.equal(refused!.status, undefined);
      assert.deepEqual(publish!.attributes, { 'messaging.system': 'mem', 'messaging.message.body.size': 5 });
      // Session ids are bearer secrets: no span carries one.
      const everything = JSON.stringify(spans);
      for (const reader of readers) assert.ok(!everything.includes(reader.config.session_id));
    } finally {
      for (const reader of readers) reader.close();
      ws?.socket.terminate();
      await r.close();
    }
  });

  it('marks a resumed stream, and a broker failure as a span error', async () => {
    const { tracer, spans } = recordingTracer();
    const broker = new MemBroker(uniqueBus('trace-fail'));
    const r = await startRelay({ tracer, broker, publish: true });
    const first = await SseReader.open(`${r.base}/events?topics=a`);
    let second: SseReader | undefined;
    try {
      await first.until(() => first.events.length >= 1, 5000, 'the config event');
      const sessionId = first.config.session_id as string;
      first.close();
      second = await SseReader.open(`${r.base}/events?session_id=${sessionId}`);
      await second.until(() => second!.events.length >= 1, 5000, 'the config event');
      assert.equal(second.config.resumed, true);
      broker.beginOutage();
      assert.equal((await post(`${r.base}/publish?topic=a`, 'x', {})).status, 503);
      broker.endOutage();
      const [, resumed, failed] = spans;
      assert.equal(resumed!.attributes['livepipe.resumed'], true);
      assert.equal(resumed!.attributes['livepipe.session'], sessionFingerprint(sessionId));
      assert.equal(failed!.name, 'livepipe.publish');
      assert.equal(failed!.attributes['livepipe.error.code'], 'broker-unavailable');
      assert.equal(failed!.status?.code, 2); // SpanStatusCode.ERROR
    } finally {
      first.close();
      second?.close();
      await r.close();
      await broker.close();
    }
  });

  it('finds the OTLP traces path from an endpoint given either way', () => {
    assert.equal(tracesUrl('http://collector:4318'), 'http://collector:4318/v1/traces');
    assert.equal(tracesUrl('http://collector:4318/'), 'http://collector:4318/v1/traces');
    assert.equal(tracesUrl('https://otlp.example/api/'), 'https://otlp.example/api/v1/traces');
    assert.equal(tracesUrl('http://127.0.0.1:4318/v1/traces'), 'http://127.0.0.1:4318/v1/traces');
  });
});

// ---------------------------------------------------------------------------------------------
// The command line.

/** A port that was free a moment ago (for runs whose start record is filtered out by the log level). */
async function freePort(): Promise<number> {
  const server = createNetServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/**
 * A driver registered before the CLI runs, on the registry dist/ uses: the in-memory broker,
 * except that close() never finishes, like a client stuck on a dead connection.
 */
function hangingBrokerImport(): string {
  const registry = pathToFileURL(`${ROOT}dist/index.js`).href;
  const code = `import { registerBroker, MemBroker } from ${JSON.stringify(registry)};
registerBroker('hang', async () => { const broker = new MemBroker('hang'); broker.close = () => new Promise(() => {}); return broker; });`;
  return `data:text/javascript,${encodeURIComponent(code)}`;
}

describe('livepipe logs', () => {
  before(() => ensureBuilt());

  it('writes JSON records with level names; debug adds one record per request, without its query', async () => {
    const lp = new LivepipeProcess(['--port', '0', '--log-level', 'debug']);
    try {
      const { base } = await lp.started();
      assert.equal((await fetch(`${base}/healthz`)).status, 200);
      const reader = await SseReader.open(`${base}/events?topics=a&access_token=SECRET-TOKEN`);
      await reader.until(() => reader.events.length >= 1, 5000, 'the config event');
      reader.close();
      await until(() => parseRecords(lp.stdout).filter((r) => r.msg === 'request').length === 2, 'two request records');
      assert.deepEqual(await lp.stop('SIGTERM'), { code: 0, signal: null });

      const records = parseRecords(lp.stdout); // every line is one
      for (const record of records) {
        assert.ok(!Number.isNaN(Date.parse(record.time)), `time ${record.time}`);
        assert.equal(typeof record.pid, 'number');
      }
      const requests = records.filter((r) => r.msg === 'request');
      assert.deepEqual(
        requests.map((r) => [r.level, r.method, r.path, r.status]),
        [
          ['debug', 'GET', '/healthz', 200],
          ['debug', 'GET', '/events', 200],
        ],
      );
      assert.equal(requests[1]!.complete, false, 'the client left the stream');
      assert.ok(!lp.stdout.includes('SECRET-TOKEN'), 'a query string is never logged');
      assert.deepEqual(
        records.filter((r) => r.msg !== 'request').map((r) => [r.level, r.msg]),
        [
          ['info', `livepipe listening on ${base} (broker mem://)`],
          ['info', 'livepipe shutting down (SIGTERM)'],
          ['info', 'livepipe stopped'],
        ],
      );
      assert.equal(lp.stderr, '');
    } finally {
      await lp.kill();
    }
  });

  it('at warn, logs nothing of a healthy run, and the error of a shutdown past its deadline (exit 1)', async () => {
    const port = await freePort();
    const lp = new LivepipeProcess(['--port', String(port), '--broker', 'hang://', '--log-level', 'warn', '--shutdown-timeout', '300'], {}, ['--import', hangingBrokerImport()]);
    try {
      const base = `http://127.0.0.1:${port}`;
      // Answered only once main() has run to its end, so the signal handlers are in place.
      await until(async () => (await fetch(`${base}/healthz`).catch(() => undefined))?.status === 200, 'the server to answer');
      const reader = await SseReader.open(`${base}/events?topics=a`);
      await reader.until(() => reader.events.length >= 1, 5000, 'the config event');
      assert.equal(lp.stdout, '', 'info and debug records are filtered out');

      const exit = await lp.stop('SIGTERM');
      assert.deepEqual(exit, { code: 1, signal: null });
      // The stream was still told to go elsewhere before the broker hung.
      await reader.until(() => reader.ended, 5000, 'the end of the stream');
      assert.match(reader.raw, /\nretry: \d+\n\n$/);
      const records = parseRecords(lp.stdout);
      assert.deepEqual(
        records.map((r: LogRecord) => [r.level, r.msg, r.waitingFor, r.timeoutMs]),
        [['error', 'shutdown took over 300 ms (still closing the broker), exiting anyway', 'closing the broker', 300]],
      );
      assert.equal(lp.stderr, '');
    } finally {
      await lp.kill();
    }
  });
});

describe('livepipe graceful shutdown', () => {
  before(() => ensureBuilt());

  it('on SIGTERM tells SSE clients to reconnect soon, closes WebSockets with 1001, and exits 0 within the deadline', async () => {
    const lp = new LivepipeProcess(['--port', '0', '--shutdown-timeout', '5000']);
    const readers: SseReader[] = [];
    let ws: WsClient | undefined;
    try {
      const { base } = await lp.started();
      readers.push(await SseReader.open(`${base}/events?topics=a`), await SseReader.open(`${base}/events?topics=b`));
      ws = await WsClient.open(`${base.replace('http:', 'ws:')}/ws?topics=a`);
      for (const reader of readers) await reader.until(() => reader.events.length >= 1, 5000, 'the config event');
      assert.equal(ws.frames[0].topic, '/httpsub/config');
      const metrics = await (await fetch(`${base}/metrics`)).text();
      assert.equal(sample(metrics, 'livepipe_connections{transport="sse"}'), 2);
      assert.equal(sample(metrics, 'livepipe_connections{transport="ws"}'), 1);

      // Exit 0 means every step finished before the deadline: past it the process exits 1.
      assert.deepEqual(await lp.stop('SIGTERM'), { code: 0, signal: null });
      for (const reader of readers) {
        await reader.until(() => reader.ended, 5000, 'the end of the stream');
        assert.ok(reader.response.complete, 'the stream was ended cleanly, not cut off');
        assert.match(reader.raw, /\nretry: \d+\n\n$/);
        assert.ok(reader.retry! <= 1000, `told to reconnect within a second, not the usual 2 s (retry: ${reader.retry})`);
      }
      await ws.until(() => ws!.closed !== undefined, 'the close frame');
      assert.deepEqual(ws.closed, { code: 1001, reason: 'relay shutting down' });

      const records = parseRecords(lp.stdout);
      assert.deepEqual(records.slice(1).map((r) => [r.level, r.msg]), [
        ['info', 'livepipe shutting down (SIGTERM)'],
        ['info', 'livepipe stopped'],
      ]);
      assert.equal(records[1]!.timeoutMs, 5000);
    } finally {
      for (const reader of readers) reader.close();
      ws?.socket.terminate();
      await lp.kill();
    }
  });

  it('cuts a client still sending its request at half the deadline, so that it alone cannot make the shutdown fail', async () => {
    const lp = new LivepipeProcess(['--port', '0', '--shutdown-timeout', '2000']);
    const slow = new Socket();
    try {
      const { base } = await lp.started();
      await new Promise<void>((resolve) => slow.connect(Number(new URL(base).port), '127.0.0.1', resolve));
      slow.on('error', () => {});
      const closed = new Promise<void>((resolve) => slow.once('close', () => resolve()));
      // Half a body, then nothing: node:http would wait for the rest until its requestTimeout (minutes).
      slow.write('POST /publish?topic=a HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n' + 'x'.repeat(500));
      await until(async () => sample(await (await fetch(`${base}/metrics`)).text(), 'livepipe_sessions') !== undefined, 'the server to be up');

      assert.deepEqual(await lp.stop('SIGTERM'), { code: 0, signal: null });
      await closed;
      assert.deepEqual(parseRecords(lp.stdout).slice(1).map((r) => r.msg), ['livepipe shutting down (SIGTERM)', 'livepipe stopped']);
    } finally {
      slow.destroy();
      await lp.kill();
    }
  });
});

/** An OTLP/HTTP collector on loopback that keeps the spans POSTed to /v1/traces (JSON encoding). */
async function startCollector(): Promise<{ url: string; spans: any[]; resources: any[]; close(): Promise<void> }> {
  const spans: any[] = [];
  const resources: any[] = [];
  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      if (req.method !== 'POST' || req.url !== '/v1/traces' || !/^application\/json/.test(req.headers['content-type'] ?? '')) {
        res.writeHead(400).end();
        return;
      }
      let body = Buffer.concat(chunks);
      if (req.headers['content-encoding'] === 'gzip') body = gunzipSync(body);
      const payload = JSON.parse(body.toString('utf8')) as { resourceSpans: Array<{ resource: any; scopeSpans: Array<{ spans: any[] }> }> };
      for (const rs of payload.resourceSpans) {
        resources.push(rs.resource);
        for (const ss of rs.scopeSpans) spans.push(...ss.spans);
      }
      res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  return {
    url: `http://127.0.0.1:${port}`,
    spans,
    resources,
    close: () => {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

/** OTLP JSON attributes ([{key, value: {stringValue | intValue | boolValue}}]) as a plain object. */
function attributesOf(span: { attributes?: Array<{ key: string; value: Record<string, unknown> }> }): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const { key, value } of span.attributes ?? []) {
    const v = value.stringValue ?? value.boolValue ?? value.intValue ?? value.doubleValue;
    out[key] = typeof v === 'string' && value.intValue !== undefined ? Number(v) : v;
  }
  return out;
}

describe('livepipe tracing (OTLP/HTTP)', () => {
  let dir: string;
  before(() => {
    ensureBuilt();
    dir = mkdtempSync(join(tmpdir(), 'livepipe-ops-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('exports spans for stream open, update_subscriptions and publish to the configured collector, flushed on shutdown', async () => {
    const collector = await startCollector();
    const config = join(dir, 'tracing.yaml');
    writeFileSync(config, `port: 0\ntracing:\n  endpoint: ${collector.url}\n  serviceName: livepipe-ops-test\n`);
    const lp = new LivepipeProcess(['--config', config]);
    let reader: SseReader | undefined;
    try {
      const { base } = await lp.started();
      reader = await SseReader.open(`${base}/events?topics=a,b`);
      await reader.until(() => reader!.events.length >= 1, 5000, 'the config event');
      const sessionId = reader.config.session_id as string;
      assert.equal((await post(`${base}/update_subscriptions`, JSON.stringify({ session_id: sessionId, add: ['c'], remove: [] }))).status, 200);
      assert.equal((await post(`${base}/publish?topic=a`, 'traced', {})).status, 204);
      await reader.until(() => reader!.messages().length === 1, 5000, 'the message');
      // Spans leave in batches; the shutdown exports what is still buffered.
      assert.deepEqual(await lp.stop('SIGTERM'), { code: 0, signal: null });
      await until(() => collector.spans.length >= 3, 'three spans');

      const byName = new Map(collector.spans.map((s) => [s.name as string, s]));
      assert.deepEqual([...byName.keys()].sort(), ['livepipe.publish', 'livepipe.stream.open', 'livepipe.update_subscriptions']);
      assert.equal(collector.spans.length, 3);
      assert.deepEqual(attributesOf(byName.get('livepipe.stream.open')!), {
        'livepipe.session': sessionFingerprint(sessionId),
        'livepipe.transport': 'sse',
        'livepipe.resumed': false,
        'livepipe.topics.count': 2,
      });
      assert.equal(attributesOf(byName.get('livepipe.update_subscriptions')!)['livepipe.topics.count'], 3);
      assert.equal(attributesOf(byName.get('livepipe.publish')!)['messaging.message.body.size'], 6);
      assert.equal(attributesOf(collector.resources[0]!)['service.name'], 'livepipe-ops-test');
      assert.ok(!JSON.stringify(collector.spans).includes(sessionId), 'no span carries the session id itself');
    } finally {
      reader?.close();
      await lp.kill();
      await collector.close();
    }
  });
});
