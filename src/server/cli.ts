import { readFileSync } from 'node:fs';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import { createServer as createH2cServer, type Http2Server, type Http2Session } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { openBroker, type Broker } from '../brokers/index.ts';
import { createRelay, type Relay, type RpcMiddleware } from '../index.ts';
import { parseCli, printConfig, relayOptions, usage, UsageError, type ServerConfig } from './args.ts';
import { SERVER_DEFAULTS } from './config.ts';
import { isClusterPrimary, isClusterWorker, joinCluster, runPrimary, workerStarted } from './cluster.ts';
import { createListener, readTls, type Listener, type TlsMaterial } from './listen.ts';
import { brokerLog, createLogger, logRequest, pathOf, silentLogger, type Logger } from './log.ts';
import { serveStatic } from './static.ts';
import { startTracing, type Tracing } from './tracing.ts';

/** The standalone server of PROTOCOL.md section 7: `livepipe [--port n] [--host a] [--broker url]`. */

/**
 * A stopping server tells SSE clients to reconnect within this delay, each at a random point in
 * it: soon, so users see no gap, but spread, so the remaining instances are not hit all at once.
 */
export const SHUTDOWN_RECONNECT_DELAY_MS = 1_000;

export interface RunningServer {
  /** e.g. http://127.0.0.1:8080 (the real port when 0 was asked for) */
  url: string;
  relay: Relay;
  server: Listener['server'];
  /** The h2c gRPC listener of --grpc-port, e.g. http://127.0.0.1:50051; undefined without the flag. */
  grpcUrl: string | undefined;
  grpcServer: Http2Server | undefined;
  /**
   * Stops accepting, tells clients to reconnect elsewhere and ends their streams, closes the
   * relay, the broker and the server, and flushes traces. Connections that have not finished
   * `forceAfterMs` after the start (a client still sending its request, a stalled gRPC stream)
   * are cut then.
   */
  shutdown(options?: { forceAfterMs?: number }): Promise<void>;
  /** What a shutdown in progress is waiting for (for the log when it takes too long). */
  readonly shutdownStage: string | undefined;
}

export class StartError extends Error {
  override readonly name = 'StartError';
}

/** Opens the broker, creates the relay and listens. Throws StartError when the broker or the address is unusable. */
export async function startServer(config: ServerConfig, log: Logger = silentLogger()): Promise<RunningServer> {
  let tls: TlsMaterial | undefined;
  try {
    tls = config.tls === undefined ? undefined : readTls(config.tls);
  } catch (err) {
    throw new StartError((err as Error).message, { cause: err });
  }
  let tracing: Tracing | undefined;
  try {
    tracing = config.tracing === undefined ? undefined : await startTracing(config.tracing, version(), (message) => log.warn({ component: 'tracing' }, message));
  } catch (err) {
    throw new StartError(`cannot start tracing: ${(err as Error).message}`, { cause: err });
  }
  let broker: Broker;
  try {
    broker = await openBroker(config.broker, { log: brokerLog(log) });
  } catch (err) {
    await tracing?.shutdown().catch(() => {});
    throw new StartError(`cannot open the broker ${redact(config.broker)}: ${(err as Error).message}`, { cause: err });
  }
  // The config file's library options, and where it sets no cors / publish, the server's policy.
  const options = relayOptions(config);
  if (options.scaleOut) options.scaleOut = { ...(options.scaleOut === true ? {} : options.scaleOut), log: brokerLog(log, 'scale-out') };
  const relay = await createRelay({ broker, ...options, ...(tracing === undefined ? {} : { tracer: tracing.tracer }) });
  // Connect and gRPC-Web on the main port; gRPC needs HTTP/2, which node serves in cleartext only on a port of its own.
  const rpc = relay.connectHandler();
  // HTTP, HTTPS, or HTTP/2 that still takes HTTP/1.1 (listen.ts). WebSocket at /ws; an upgrade for any other path is answered 404.
  const listener = createListener(tls, config.http2 === true, (req, res) => void handle(relay, rpc, req, res, log), (req, socket, head) => {
    if (relay.handleUpgrade(req, socket, head)) return;
    socket.on('error', () => {}); // node:http no longer listens, and the client may be gone already
    socket.end('HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
  });
  const server = listener.server;
  // A --workers process: other workers' sessions are routed to them, /metrics covers them all (cluster.ts).
  const fast = isClusterWorker() ? await joinCluster(relay, listener) : {};
  // Streams are served before node:http (about twice the opens a second); a debug request log
  // hears node:http's responses, so with one every request goes to node:http.
  if (listener.scheme === 'http' && !log.isLevelEnabled('debug')) relay.serveStreamsFast(listener.server as Server, fast);
  const grpc = config.grpcPort === undefined ? undefined : createH2cServer((req, res) => void rpc(req, res));
  const h2Sessions = new Set<Http2Session>();
  grpc?.on('session', (session) => {
    h2Sessions.add(session);
    session.once('close', () => h2Sessions.delete(session));
  });
  let listeningOn = config.port;
  try {
    await listen(server, config.port, config.host);
    if (grpc !== undefined) await listen(grpc, (listeningOn = config.grpcPort!), config.host);
  } catch (err) {
    server.close();
    grpc?.close();
    await relay.close();
    await broker.close();
    await tracing?.shutdown().catch(() => {});
    throw new StartError(`cannot listen on ${hostPort(config.host, listeningOn)}: ${(err as Error).message}`, { cause: err });
  }
  const { port } = server.address() as AddressInfo;
  const closed = new Promise<void>((resolve) => server.once('close', resolve));
  const grpcClosed = grpc === undefined ? undefined : new Promise<void>((resolve) => grpc.once('close', resolve));

  let stopping: Promise<void> | undefined;
  let stage: string | undefined;
  const shutdown = ({ forceAfterMs }: { forceAfterMs?: number } = {}) =>
    (stopping ??= (async () => {
      // A client in the middle of a slow request, or an HTTP/2 stream that takes nothing, would hold
      // its connection, and so the exit, past the deadline. (An SSE response that was ended goes
      // with closeIdleConnections below, flushed or not.)
      const force = forceAfterMs === undefined ? undefined : setTimeout(() => {
        listener.closeAll();
        for (const session of h2Sessions) session.destroy();
      }, forceAfterMs);
      force?.unref();
      // No new connections, idle ones closed now; a closing server also closes each busy one
      // as soon as its response has been sent, so ended streams close their sockets cleanly.
      server.close();
      grpc?.close();
      stage = 'ending streams and broker subscriptions';
      // SSE clients are told to reconnect soon (to another instance), WebSocket ones get 1001, RPC streams end.
      await relay.close({ reconnectDelayMs: SHUTDOWN_RECONNECT_DELAY_MS });
      // Ended streams leave keep-alive connections idle once their last bytes are flushed; close
      // those rather than wait out keepAliveTimeout.
      await new Promise((resolve) => setImmediate(resolve));
      listener.closeIdle();
      // HTTP/2 clients keep idle sessions open: a GOAWAY lets in-flight calls finish, then closes them.
      for (const session of h2Sessions) session.close();
      stage = 'closing the broker';
      await broker.close();
      stage = 'waiting for client connections to finish';
      await closed;
      await grpcClosed;
      clearTimeout(force);
      stage = 'exporting traces';
      await tracing?.shutdown().catch((err: unknown) => log.warn({ component: 'tracing' }, `traces not exported: ${(err as Error).message}`));
      stage = undefined;
    })());

  const grpcUrl = grpc === undefined ? undefined : `http://${hostPort(config.host, (grpc.address() as AddressInfo).port)}`;
  return {
    url: `${listener.scheme}://${hostPort(config.host, port)}`,
    grpcUrl,
    grpcServer: grpc,
    relay,
    server,
    shutdown,
    get shutdownStage() {
      return stage;
    },
  };
}

function listen(server: Listener['server'] | Http2Server, port: number, host: string): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
}

async function handle(relay: Relay, rpc: RpcMiddleware, req: IncomingMessage, res: ServerResponse, log: Logger): Promise<void> {
  logRequest(log, req, res);
  try {
    let other = false;
    await rpc(req, res, () => relay.handler(req, res, () => {
      other = true;
    }));
    if (other) await serveStatic(req, res);
  } catch (err) {
    log.error({ err, method: req.method, path: pathOf(req.url) }, `error serving ${req.method} ${pathOf(req.url)}`);
    if (!res.headersSent) res.writeHead(500, { 'content-type': 'application/json' }).end('{"error":{"code":"internal","message":"internal error"}}');
    else res.destroy();
  }
}

/** Runs the command line; sets process.exitCode (2 for usage errors, 1 when the server cannot start). */
export async function main(argv: string[] = process.argv.slice(2), env: NodeJS.ProcessEnv = process.env): Promise<void> {
  let config: ServerConfig;
  try {
    const command = parseCli(argv, env);
    if (command.kind === 'help') return void process.stdout.write(`${usage()}\n`);
    if (command.kind === 'version') return void process.stdout.write(`${version()}\n`);
    if (command.kind === 'print-config') return void process.stdout.write(printConfig(command.config));
    config = command.config;
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`livepipe: ${err.message}\n`);
    process.exitCode = 2;
    return;
  }

  // From here on every line on stdout is a JSON log record (see log.ts); only usage errors above are plain.
  const log = createLogger(config.logLevel);
  // --workers N: this process supervises N workers, each of which runs this same command.
  if (isClusterPrimary(config)) return runPrimary(config, { log, shutdownMs: config.shutdownTimeoutMs ?? SERVER_DEFAULTS.shutdownTimeoutMs });
  let running: RunningServer;
  try {
    running = await startServer(config, log);
  } catch (err) {
    log.fatal((err as Error).message);
    process.exitCode = 1;
    if (isClusterWorker()) process.exit(); // its IPC channel to the primary would keep it running
    return;
  }
  const serverError = (err: Error) => {
    log.fatal({ err }, `server error: ${err.message}`);
    process.exit(1);
  };
  running.server.on('error', serverError);
  running.grpcServer?.on('error', serverError);

  const timeoutMs = config.shutdownTimeoutMs ?? SERVER_DEFAULTS.shutdownTimeoutMs;
  let signalled = false;
  const stop = (signal: NodeJS.Signals) => {
    if (signalled) {
      // A second Ctrl-C: the user does not want to wait.
      log.warn({ signal }, `${signal} again, exiting now`);
      process.exit(1);
    }
    signalled = true;
    log.info({ signal, timeoutMs }, `livepipe shutting down (${signal})`);
    // Kept referenced: a step that hangs on a promise alone (nothing else keeps the process up)
    // must still end in this record and exit 1, not in a silent exit 0.
    setTimeout(() => {
      log.error({ timeoutMs, waitingFor: running.shutdownStage }, `shutdown took over ${timeoutMs} ms (still ${running.shutdownStage ?? 'stopping'}), exiting anyway`);
      process.exit(1);
    }, timeoutMs);
    // Connections still busy at half the deadline are cut, so that a slow client alone cannot make it pass.
    running.shutdown({ forceAfterMs: timeoutMs / 2 }).then(
      () => {
        log.info('livepipe stopped');
        process.exit(0); // a broker client may hold the event loop open; the work is done
      },
      (err: unknown) => {
        log.error({ err }, `shutdown failed: ${(err as Error).message}`);
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  if (running.grpcUrl !== undefined) log.info({ grpcUrl: running.grpcUrl }, `livepipe serving gRPC (h2c) on ${running.grpcUrl}`);
  // Only now: whoever waits for this record may signal at once, and must find the handlers in place.
  log.info({ url: running.url, broker: redact(config.broker) }, `livepipe listening on ${running.url} (broker ${redact(config.broker)})`);
  workerStarted(() => stop('SIGTERM')); // in a --workers process, the primary may stop it too
}

export function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}

function hostPort(host: string, port: number): string {
  return `${host.includes(':') ? `[${host}]` : host}:${port}`;
}

/** The broker URL without its password, for logs. */
function redact(url: string): string {
  const parsed = new URL(url);
  if (parsed.password === '') return url;
  parsed.password = '***';
  return parsed.toString();
}

