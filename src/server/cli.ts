import { readFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createH2cServer, type Http2Server, type Http2Session } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { openBroker, type Broker } from '../brokers/index.ts';
import { createRelay, type Relay, type RpcMiddleware } from '../index.ts';
import { parseCli, serverPolicy, usage, UsageError, type ServerConfig } from './args.ts';
import { serveStatic } from './static.ts';

/** The standalone server of PROTOCOL.md section 7: `livepipe [--port n] [--host a] [--broker url]`. */

/** How long a graceful shutdown may take before the process exits anyway. */
export const SHUTDOWN_DEADLINE_MS = 10_000;

export interface RunningServer {
  /** e.g. http://127.0.0.1:8080 (the real port when 0 was asked for) */
  url: string;
  relay: Relay;
  server: Server;
  /** The h2c gRPC listener of --grpc-port, e.g. http://127.0.0.1:50051; undefined without the flag. */
  grpcUrl: string | undefined;
  grpcServer: Http2Server | undefined;
  /** Stops accepting, ends open streams, closes the relay, the broker and the server. */
  shutdown(): Promise<void>;
}

export class StartError extends Error {
  override readonly name = 'StartError';
}

/** Opens the broker, creates the relay and listens. Throws StartError when the broker or the address is unusable. */
export async function startServer(config: ServerConfig): Promise<RunningServer> {
  let broker: Broker;
  try {
    broker = await openBroker(config.broker, { log: logBroker });
  } catch (err) {
    throw new StartError(`cannot open the broker ${redact(config.broker)}: ${(err as Error).message}`, { cause: err });
  }
  const relay = await createRelay({ broker, ...serverPolicy(config) });
  // Connect and gRPC-Web on the main port; gRPC needs HTTP/2, which node serves in cleartext only on a port of its own.
  const rpc = relay.connectHandler();
  const server = createServer((req, res) => void handle(relay, rpc, req, res));
  // WebSocket at /ws; an upgrade for any other path is answered 404.
  server.on('upgrade', (req, socket, head) => {
    if (relay.handleUpgrade(req, socket, head)) return;
    socket.on('error', () => {}); // node:http no longer listens, and the client may be gone already
    socket.end('HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
  });
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
    throw new StartError(`cannot listen on ${hostPort(config.host, listeningOn)}: ${(err as Error).message}`, { cause: err });
  }
  const { port } = server.address() as AddressInfo;
  const closed = new Promise<void>((resolve) => server.once('close', resolve));
  const grpcClosed = grpc === undefined ? undefined : new Promise<void>((resolve) => grpc.once('close', resolve));

  let stopping: Promise<void> | undefined;
  const shutdown = () =>
    (stopping ??= (async () => {
      // No new connections, idle ones closed now; a closing server also closes each busy one
      // as soon as its response has been sent, so ended streams close their sockets cleanly.
      server.close();
      grpc?.close();
      await relay.close(); // ends every stream, so clients reconnect elsewhere
      // Ended streams leave keep-alive connections idle once their last bytes are flushed; close
      // those rather than wait out keepAliveTimeout.
      await new Promise((resolve) => setImmediate(resolve));
      server.closeIdleConnections();
      // HTTP/2 clients keep idle sessions open: a GOAWAY lets in-flight calls finish, then closes them.
      for (const session of h2Sessions) session.close();
      await broker.close();
      await closed;
      await grpcClosed;
    })());

  const grpcUrl = grpc === undefined ? undefined : `http://${hostPort(config.host, (grpc.address() as AddressInfo).port)}`;
  return { url: `http://${hostPort(config.host, port)}`, grpcUrl, grpcServer: grpc, relay, server, shutdown };
}

function listen(server: Server | Http2Server, port: number, host: string): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
}

async function handle(relay: Relay, rpc: RpcMiddleware, req: IncomingMessage, res: ServerResponse): Promise<void> {
  try {
    let other = false;
    await rpc(req, res, () => relay.handler(req, res, () => {
      other = true;
    }));
    if (other) await serveStatic(req, res);
  } catch (err) {
    process.stderr.write(`livepipe: error serving ${req.method} ${req.url}: ${(err as Error).stack ?? String(err)}\n`);
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
    config = command.config;
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`livepipe: ${err.message}\n`);
    process.exitCode = 2;
    return;
  }

  let running: RunningServer;
  try {
    running = await startServer(config);
  } catch (err) {
    process.stderr.write(`livepipe: ${(err as Error).message}\n`);
    process.exitCode = 1;
    return;
  }
  const serverError = (err: Error) => {
    process.stderr.write(`livepipe: server error: ${err.message}\n`);
    process.exit(1);
  };
  running.server.on('error', serverError);
  running.grpcServer?.on('error', serverError);

  let signalled = false;
  const stop = (signal: NodeJS.Signals) => {
    if (signalled) {
      // A second Ctrl-C: the user does not want to wait.
      process.stderr.write(`livepipe: ${signal} again, exiting now\n`);
      process.exit(1);
    }
    signalled = true;
    process.stdout.write(`livepipe shutting down (${signal})\n`);
    const deadline = setTimeout(() => {
      process.stderr.write(`livepipe: shutdown took over ${SHUTDOWN_DEADLINE_MS / 1000}s, exiting anyway\n`);
      process.exit(1);
    }, SHUTDOWN_DEADLINE_MS);
    deadline.unref();
    running.shutdown().then(
      () => process.exit(0), // a broker client may hold the event loop open; the work is done
      (err: unknown) => {
        process.stderr.write(`livepipe: shutdown failed: ${(err as Error).message}\n`);
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  if (running.grpcUrl !== undefined) process.stdout.write(`livepipe serving gRPC (h2c) on ${running.grpcUrl}\n`);
  // Only now: whoever waits for this line may signal at once, and must find the handlers in place.
  process.stdout.write(`livepipe listening on ${running.url} (broker ${redact(config.broker)})\n`);
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

function logBroker(level: 'info' | 'warn' | 'error', message: string, details?: Record<string, unknown>): void {
  const line = `livepipe broker ${level}: ${message}${details === undefined ? '' : ` ${JSON.stringify(details)}`}\n`;
  (level === 'info' ? process.stdout : process.stderr).write(line);
}
