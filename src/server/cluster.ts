import cluster, { type Worker } from 'node:cluster';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, request as httpRequest, type IncomingHttpHeaders, type IncomingMessage, type OutgoingHttpHeaders, type ServerResponse } from 'node:http';
import { connect, type AddressInfo, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import type { Duplex } from 'node:stream';
import { AggregatorRegistry } from 'prom-client';
import type { Principal } from '../auth.ts';
import { RelayError } from '../errors.ts';
import { fromWire, toWire, type WireError } from '../wire-error.ts';
import { parseEventId } from '../frames.ts';
import type { FastStreamOptions, Relay, UpdateRequest, UpdateResult } from '../index.ts';
import { setSessionIdPrefix } from '../session.ts';
import type { ServerConfig } from './args.ts';
import type { Listener, RequestListener, UpgradeListener } from './listen.ts';
import type { Logger } from './log.ts';
import { SERVER_DEFAULTS } from './config.ts';

/**
 * `--workers N`: N processes serve one port (node:cluster). Each worker is a complete relay with
 * its own broker connection and subscriptions, which broadcast semantics make correct on every
 * broker. The primary serves nothing; it starts and restarts workers and relays their IPC:
 *
 * - A session id names the worker that owns the session (2 bytes before the 128 random bits).
 * - update_subscriptions for another worker's session is applied by that worker, through the
 *   primary, and answered with its result (so its identity check and rate limit apply there).
 * - A stream that resumes another worker's session (Last-Event-ID, session_id; SSE and
 *   WebSocket) is served by the owner. A cleartext connection is handed over: the socket itself
 *   moves to the owner, which parses the request again. TLS state cannot move between
 *   processes, so over HTTPS / HTTP/2 the request is proxied to the owner's private unix socket.
 * - /metrics on any worker answers for all of them (prom-client's AggregatorRegistry).
 * - On mem://, whose bus lives inside one process, HTTP publishes go to every worker's bus.
 *
 * When the owner is gone (crashed, restarted under a new id), a resume becomes a new session and
 * an update answers unknown-session, as after the session TTL. The caps on connections per
 * address, sessions and the publish rate count per worker; a session's update rate is its owner's.
 */

/** Worker restarts allowed within RESTART_WINDOW_MS before the primary gives up and exits 1. */
const RESTART_LIMIT = 5;
const RESTART_WINDOW_MS = 60_000;
/** Set by the primary in the workers it starts. */
const WORKER_ENV = 'LIVEPIPE_CLUSTER_WORKER';
/** Set by the primary: where workers put their private sockets (`<base>-<worker id>.sock`). */
const SOCKETS_ENV = 'LIVEPIPE_WORKER_SOCKETS';
/** The client's address, from a worker proxying to a private socket. */
const PEER_HEADER = 'x-livepipe-peer';
/** Names the worker (its cluster id) that answered a request: for operators, and for tests to see where a request landed. */
export const WORKER_HEADER = 'x-livepipe-worker';
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'te', 'trailer', 'host', PEER_HEADER]);

/** The bearer of a forwarded update; undefined for a trusted call (no principal). */
type Bearer = { token: string | undefined } | undefined;

type Message =
  | { livepipe: 'serving'; port: number }
  | { livepipe: 'ready' }
  | { livepipe: 'workers'; ids: number[] }
  | { livepipe: 'update'; ref: number; to: number; from?: number; request: UpdateRequest; bearer: Bearer }
  | { livepipe: 'updated'; ref: number; to: number; result?: UpdateResult; error?: WireError }
  | { livepipe: 'handoff'; to: number; head: Uint8Array }
  | { livepipe: 'publish'; topic: string; body: Uint8Array }
  | { livepipe: 'metrics'; ref: number; text?: string; contentType?: string; error?: string }
  | { livepipe: 'shutdown' };

function isMessage(value: unknown): value is Message {
  return typeof value === 'object' && value !== null && typeof (value as { livepipe?: unknown }).livepipe === 'string';
}

/** True in the process that should run the primary rather than serve. */
export function isClusterPrimary(config: Pick<ServerConfig, 'workers'>): boolean {
  return (config.workers ?? SERVER_DEFAULTS.workers) > 1 && cluster.isPrimary;
}

/** True in a worker that runPrimary started (not in a worker of some other cluster that embeds startServer). */
export function isClusterWorker(): boolean {
  return cluster.isWorker && process.env[WORKER_ENV] === '1';
}

// ---------------------------------------------------------------------------------------------
// The primary

export interface PrimaryOptions {
  log: Logger;
  /** The workers' own shutdown deadline; the primary kills what is left a little after it. */
  shutdownMs: number;
}

/** Starts config.workers workers running this same command, and supervises them until a signal stops them all. */
export function runPrimary(config: ServerConfig, { log, shutdownMs }: PrimaryOptions): void {
  const count = config.workers ?? SERVER_DEFAULTS.workers;
  // Private sockets exist only where connections cannot be handed over: TLS.
  const socketDir = config.tls === undefined ? undefined : mkdtempSync(join(tmpdir(), 'livepipe-'));
  // 'advanced' carries Buffers as bytes (publishes) and still passes sockets.
  cluster.setupPrimary({ serialization: 'advanced' });
  const aggregator = new AggregatorRegistry();
  const serving = new Set<number>();
  const ready = new Set<number>();
  const restarts: number[] = [];
  let port: number | undefined;
  let started = false;
  let stopping = false;
  let failed = false;

  const workers = () => Object.values(cluster.workers ?? {}).filter((w): w is Worker => w !== undefined && !w.isDead());
  const announce = () => {
    for (const worker of workers()) send(worker, { livepipe: 'workers', ids: [...serving] });
  };
  // Windows keeps local sockets out of the file system: a named pipe of the same unique name.
  const sockets = socketDir === undefined ? undefined : process.platform === 'win32' ? `\\\\.\\pipe\\${basename(socketDir)}` : join(socketDir, 'worker');
  const fork = () => cluster.fork({ [WORKER_ENV]: '1', ...(sockets === undefined ? {} : { [SOCKETS_ENV]: sockets }) });

  const finish = () => {
    if (socketDir !== undefined) rmSync(socketDir, { recursive: true, force: true });
    process.exit(failed ? 1 : 0);
  };
  const stopAll = () => {
    stopping = true;
    if (workers().length === 0) return finish();
    for (const worker of workers()) send(worker, { livepipe: 'shutdown' });
    setTimeout(() => {
      log.error({ workers: workers().map((w) => w.process.pid) }, 'workers still running after the shutdown deadline, killing them');
      for (const worker of workers()) worker.process.kill('SIGKILL');
      failed = true;
    }, shutdownMs + 2_000).unref();
  };

  cluster.on('message', (worker, message: unknown, handle: unknown) => {
    if (!isMessage(message)) return; // prom-client's own messages
    switch (message.livepipe) {
      case 'serving':
        port ??= message.port;
        serving.add(worker.id);
        announce();
        return;
      case 'ready':
        ready.add(worker.id);
        // Told to stop while it was starting: it can act on it now.
        if (stopping) send(worker, { livepipe: 'shutdown' });
        if (!started && ready.size === count) {
          started = true;
          const host = config.host.includes(':') ? `[${config.host}]` : config.host;
          const url = `${config.tls === undefined ? 'http' : 'https'}://${host}:${port}`;
          log.info({ url, workers: workers().map((w) => ({ id: w.id, pid: w.process.pid })) }, `${count} workers serving ${url}`);
        }
        return;
      case 'update': {
        const owner = serving.has(message.to) ? cluster.workers?.[message.to] : undefined;
        if (owner === undefined) send(worker, { livepipe: 'updated', ref: message.ref, to: worker.id, error: ownerGone() });
        else send(owner, { ...message, from: worker.id });
        return;
      }
      case 'updated': {
        const asker = cluster.workers?.[message.to];
        if (asker !== undefined) send(asker, message);
        return;
      }
      case 'handoff': {
        const socket = handle as Socket | undefined;
        const owner = serving.has(message.to) ? cluster.workers?.[message.to] : undefined;
        // The owner died meanwhile: the client reconnects and gets a new session.
        if (owner === undefined || socket === undefined) socket?.destroy();
        else send(owner, message, socket);
        return;
      }
      case 'publish':
        for (const each of workers()) send(each, message);
        return;
      case 'metrics':
        aggregator.clusterMetrics().then(
          (text) => send(worker, { livepipe: 'metrics', ref: message.ref, text, contentType: aggregator.contentType }),
          (err: Error) => send(worker, { livepipe: 'metrics', ref: message.ref, error: err.message }),
        );
        return;
    }
  });

  cluster.on('exit', (worker, code, signal) => {
    const wasServing = serving.delete(worker.id);
    ready.delete(worker.id);
    if (wasServing) announce();
    if (stopping) {
      if (code !== 0) failed = true;
      if (workers().length === 0) finish();
      return;
    }
    const how = signal === null ? `exit code ${code}` : signal;
    if (!started) {
      // A worker that cannot start (broker, address, TLS files) says why itself; the others would fail alike.
      log.error({ worker: worker.process.pid }, `a worker failed to start (${how}); stopping`);
      failed = true;
      return stopAll();
    }
    const now = Date.now();
    while (restarts.length > 0 && now - restarts[0]! > RESTART_WINDOW_MS) restarts.shift();
    if (restarts.length >= RESTART_LIMIT) {
      log.error({ worker: worker.process.pid }, `a worker exited (${how}), the ${RESTART_LIMIT + 1}th time within ${RESTART_WINDOW_MS / 1000}s; stopping`);
      failed = true;
      return stopAll();
    }
    restarts.push(now);
    log.warn({ worker: worker.process.pid }, `a worker exited (${how}); starting another`);
    fork();
  });

  const onSignal = (signal: NodeJS.Signals) => {
    if (stopping) {
      // A second Ctrl-C: the user does not want to wait.
      for (const worker of workers()) worker.process.kill('SIGKILL');
      failed = true;
      return finish();
    }
    log.info({ signal }, 'shutting down the workers');
    stopAll();
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  for (let i = 0; i < count; i++) fork();
}

/** Sends to a worker (or the primary) unless the channel is gone, swallowing a failure: the exit handling covers it. */
function send(to: Worker | NodeJS.Process, message: Message, socket?: Socket): void {
  const connected = 'isConnected' in to ? to.isConnected() : to.connected;
  if (!connected) {
    socket?.destroy();
    return;
  }
  // With a socket, our copy is closed once it went (or could not go): the receiver holds its own.
  const done = () => socket?.destroy();
  if (socket === undefined) to.send!(message, undefined, {}, done);
  else to.send!(message, socket, {}, done);
}

function ownerGone(): WireError {
  return { code: 'unknown-session', message: 'no such session (the worker that held it has stopped); open a new stream' };
}

// ---------------------------------------------------------------------------------------------
// A worker

/** Session ids in a cluster: base64url of [worker id: 2 bytes][128 random bits], 24 characters. */
export function ownerOf(sessionId: string | null | undefined): number | undefined {
  if (sessionId?.length !== 24 || !/^[\w-]+$/.test(sessionId)) return undefined;
  return Buffer.from(sessionId, 'base64url').readUInt16BE(0);
}

let shutdownRequested = false;
let gracefulStop: (() => void) | undefined;
let signalled = false;

/**
 * In a cluster worker, before it listens: names this worker in new session ids, routes other
 * workers' sessions to them, answers /metrics for the whole cluster, and spreads mem:// publishes.
 */
export async function joinCluster(relay: Relay, listener: Listener): Promise<FastStreamOptions> {
  const me = cluster.worker!.id;
  const core = relay.core;
  const paths = core.options.paths;
  const idTag = Buffer.alloc(2);
  idTag.writeUInt16BE(me & 0xffff);
  setSessionIdPrefix(idTag);

  let serving = new Set<number>();
  const pending = new Map<number, { to: number | undefined; settle: (reply: Message) => void }>();
  let nextRef = 0;
  const ask = (to: number | undefined, message: (ref: number) => Message) =>
    new Promise<Message>((resolve) => {
      const ref = nextRef++;
      pending.set(ref, { to, settle: resolve });
      send(process, message(ref));
    });
  // Another worker's session, whose owner still serves (one that stopped took its sessions along).
  const remoteOwner = (sessionId: string | null | undefined) => {
    const owner = ownerOf(sessionId);
    return owner !== undefined && owner !== me && serving.has(owner) ? owner : undefined;
  };

  // Sessions of other nodes (scale-out, whose ids are longer) are routed by what was set before.
  const forwardElsewhere = core.forwardUpdate;
  core.forwardUpdate = (request, principal) => {
    const owner = remoteOwner(request.sessionId);
    if (owner === undefined) return forwardElsewhere?.(request, principal);
    // The owner authenticates the same bearer again: a Principal does not cross processes.
    const bearer: Bearer = principal === undefined ? undefined : { token: principal.token };
    return ask(owner, (ref) => ({ livepipe: 'update', ref, to: owner, request, bearer })).then((reply) => {
      if (reply.livepipe !== 'updated') throw new RelayError('internal', 'unexpected reply from the cluster');
      if (reply.error !== undefined) throw fromWire(reply.error);
      return reply.result!;
    });
  };

  if (core.broker.scheme === 'mem') {
    // The in-memory bus lives in each process: a publish goes through the primary to every
    // worker's bus, so that subscribers on any worker get it. A broken bus still answers here.
    const broker = core.broker;
    const deliver = broker.publish.bind(broker);
    broker.publish = async (topic, body) => {
      if (!broker.isConnected()) return deliver(topic, body);
      send(process, { livepipe: 'publish', topic, body });
    };
    process.on('message', (message: unknown) => {
      if (isMessage(message) && message.livepipe === 'publish') deliver(message.topic, message.body).catch(() => {});
    });
  }

  // The primary asks every worker for its metrics in prom-client's format.
  AggregatorRegistry.setRegistries([relay.metrics]);
  new AggregatorRegistry();

  const server = listener.server;
  const serve = server.listeners('request')[0] as RequestListener;
  const upgrade = server.listeners('upgrade')[0] as UpgradeListener;
  const secure = listener.scheme === 'https';
  const sockets = process.env[SOCKETS_ENV];
  const socketPath = (worker: number) => `${sockets}-${worker}.sock`;

  // As the relay itself looks: the session of Last-Event-ID first, then session_id.
  const sessionOwner = (lastEventId: string | null | undefined, sessionId: string | null) => remoteOwner(parseEventId(lastEventId)?.sessionId) ?? remoteOwner(sessionId);
  const streamOwner = (req: IncomingMessage, path: string) => {
    const url = new URL(req.url ?? '/', 'http://relay');
    if (url.pathname !== path || req.method !== 'GET') return undefined;
    return sessionOwner(header(req.headers, 'last-event-id') ?? url.searchParams.get('last_event_id'), url.searchParams.get('session_id'));
  };
  const handOff = (req: IncomingMessage, socket: Socket, head: Buffer, to: number) => {
    socket.pause();
    send(process, { livepipe: 'handoff', to, head: Buffer.concat([requestHead(req), head]) }, socket);
  };

  server.removeAllListeners('request');
  server.on('request', (req: IncomingMessage, res: ServerResponse) => {
    // Which worker answered (a request handed to another worker is answered by that one).
    res.setHeader(WORKER_HEADER, String(me));
    if (req.method === 'GET' && new URL(req.url ?? '/', 'http://relay').pathname === paths.metrics) {
      void ask(undefined, (ref) => ({ livepipe: 'metrics', ref })).then((reply) => sendMetrics(res, reply));
      return;
    }
    const owner = streamOwner(req, paths.events);
    if (owner === undefined) serve(req, res);
    else if (secure) proxyRequest(req, res, socketPath(owner));
    else handOff(req, req.socket, Buffer.alloc(0), owner);
  });
  server.removeAllListeners('upgrade');
  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    const owner = streamOwner(req, paths.ws);
    if (owner === undefined) upgrade(req, socket, head);
    else if (secure) proxyUpgrade(req, socket, head, socketPath(owner));
    else handOff(req, socket as Socket, head, owner);
  });

  process.on('message', (message: unknown, handle: unknown) => {
    if (!isMessage(message)) return;
    switch (message.livepipe) {
      case 'workers':
        serving = new Set(message.ids);
        // An owner that stopped will not answer.
        for (const [ref, call] of pending) {
          if (call.to === undefined || serving.has(call.to)) continue;
          pending.delete(ref);
          call.settle({ livepipe: 'updated', ref, to: me, error: ownerGone() });
        }
        return;
      case 'updated':
      case 'metrics':
        pending.get(message.ref)?.settle(message);
        pending.delete(message.ref);
        return;
      case 'update':
        void applyUpdate(relay, message).then((reply) => send(process, reply));
        return;
      case 'handoff': {
        // Parsed again from the start, as if the client had connected here.
        const socket = handle as Socket;
        socket.unshift(Buffer.from(message.head));
        server.emit('connection', socket);
        socket.resume();
        return;
      }
      case 'shutdown':
        shutdownRequested = true;
        if (gracefulStop !== undefined && !signalled) {
          signalled = true;
          gracefulStop();
        }
        return;
    }
  });

  if (secure) {
    if (sockets === undefined) throw new Error(`${SOCKETS_ENV} is not set: workers are started by the primary`);
    // Where other workers proxy this worker's sessions; the client's address comes along.
    const adopt = (req: IncomingMessage) => {
      const peer = header(req.headers, PEER_HEADER);
      delete req.headers[PEER_HEADER];
      if (peer !== undefined) Object.defineProperty(req.socket, 'remoteAddress', { value: peer, configurable: true });
    };
    const inner = createServer((req, res) => {
      adopt(req);
      res.setHeader(WORKER_HEADER, String(me));
      serve(req, res);
    });
    inner.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
      adopt(req);
      upgrade(req, socket, head);
    });
    // exclusive: this worker's own socket, not one shared through the primary.
    await new Promise<void>((resolve, reject) => inner.once('error', reject).listen({ path: socketPath(me), exclusive: true }, resolve));
  }

  server.once('listening', () => send(process, { livepipe: 'serving', port: (server.address() as AddressInfo).port }));
  // For streams served before node:http (fast-streams.ts): the same worker header, and other workers' sessions left to the routing above.
  return {
    headers: { [WORKER_HEADER]: String(me) },
    decline: (head) => {
      const query = new URLSearchParams(head.query);
      return sessionOwner(head.headers['last-event-id'] ?? query.get('last_event_id'), query.get('session_id')) !== undefined;
    },
  };
}

/**
 * In a cluster worker, once it serves and its signal handlers are in place: tells the primary,
 * and lets the primary stop it with `stop` (the graceful shutdown a SIGTERM would start). A
 * worker that got the signal itself (Ctrl-C reaches the whole process group) is not stopped twice.
 */
export function workerStarted(stop: () => void): void {
  if (!isClusterWorker()) return;
  const mark = () => {
    signalled = true;
  };
  process.on('SIGTERM', mark);
  process.on('SIGINT', mark);
  gracefulStop = stop;
  if (shutdownRequested && !signalled) {
    signalled = true;
    stop();
  }
  send(process, { livepipe: 'ready' });
}

async function applyUpdate(relay: Relay, message: Extract<Message, { livepipe: 'update' }>): Promise<Message> {
  const reply = { livepipe: 'updated' as const, ref: message.ref, to: message.from! };
  try {
    let principal: Principal | undefined;
    if (message.bearer !== undefined) {
      const token = message.bearer.token;
      principal = await relay.core.authenticate(token === undefined ? {} : { authorization: `Bearer ${token}` });
    }
    return { ...reply, result: await relay.core.updateSubscriptions(message.request, principal) };
  } catch (err) {
    return { ...reply, error: toWire(err) };
  }
}

function sendMetrics(res: ServerResponse, reply: Message): void {
  if (reply.livepipe !== 'metrics' || reply.text === undefined) {
    const error = new RelayError('internal', `cannot collect the workers' metrics: ${reply.livepipe === 'metrics' ? reply.error : 'no answer'}`);
    res.writeHead(error.status, { 'content-type': 'application/json; charset=utf-8' }).end(JSON.stringify(error.toJSON()));
    return;
  }
  res.writeHead(200, { 'content-type': reply.contentType ?? 'text/plain' }).end(reply.text);
}

function header(headers: IncomingHttpHeaders, name: string): string | undefined {
  const value = headers[name];
  return Array.isArray(value) ? value[0] : value;
}

/** The request line and headers as the client sent them (node:http keeps header bytes as latin1). */
function requestHead(req: IncomingMessage, peer?: string): Buffer {
  let head = `${req.method} ${req.url} HTTP/${req.httpVersion}\r\n`;
  for (let i = 0; i < req.rawHeaders.length; i += 2) {
    if (req.rawHeaders[i]!.toLowerCase() !== PEER_HEADER) head += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
  }
  if (peer !== undefined) head += `${PEER_HEADER}: ${peer}\r\n`;
  return Buffer.from(`${head}\r\n`, 'latin1');
}

/** Serves an HTTPS or HTTP/2 request through the owner's private socket: its response is streamed back as it comes. */
function proxyRequest(req: IncomingMessage, res: ServerResponse, socketPath: string): void {
  const headers: OutgoingHttpHeaders = {};
  for (const [name, value] of Object.entries(req.headers)) {
    if (!name.startsWith(':') && !HOP_BY_HOP.has(name) && value !== undefined) headers[name] = value;
  }
  headers.host = req.headers.host ?? header(req.headers, ':authority') ?? 'localhost';
  if (req.socket.remoteAddress !== undefined) headers[PEER_HEADER] = req.socket.remoteAddress;
  const upstream = httpRequest({ socketPath, method: req.method, path: req.url, headers, agent: false });
  upstream.on('response', (answer) => {
    const back: OutgoingHttpHeaders = {};
    for (const [name, value] of Object.entries(answer.headers)) if (!HOP_BY_HOP.has(name) && value !== undefined) back[name] = value;
    res.writeHead(answer.statusCode ?? 502, back);
    answer.pipe(res);
    answer.on('error', () => res.destroy());
  });
  upstream.on('error', () => {
    if (res.headersSent) return void res.destroy();
    const error = new RelayError('broker-unavailable', 'the worker holding this session did not answer; retry');
    res.writeHead(error.status, { 'content-type': 'application/json; charset=utf-8' }).end(JSON.stringify(error.toJSON()));
  });
  // The client left: so does the owner's stream.
  res.on('close', () => upstream.destroy());
  upstream.end();
}

/** A WebSocket upgrade over TLS: the owner's private socket and the client's are joined byte for byte. */
function proxyUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer, socketPath: string): void {
  const upstream = connect(socketPath);
  upstream.write(requestHead(req, req.socket.remoteAddress));
  if (head.length > 0) upstream.write(head);
  socket.pipe(upstream).pipe(socket);
  const close = () => {
    socket.destroy();
    upstream.destroy();
  };
  socket.on('error', close).on('close', close);
  upstream.on('error', close).on('close', close);
}
