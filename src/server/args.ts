import { parseArgs, type ParseArgsConfig } from 'node:util';
import { registeredSchemes } from '../brokers/index.ts';
import { isLoopbackHost } from '../net.ts';
import type { CorsOptions } from '../options.ts';

export { isLoopbackHost };

/** Command-line parsing for the standalone server (PROTOCOL.md section 7). */

export interface ServerConfig {
  host: string;
  port: number;
  /** A broker URL whose scheme has a registered driver. */
  broker: string;
  /** Port of a cleartext HTTP/2 (h2c) listener for gRPC clients, on the same host; none when absent. */
  grpcPort?: number;
}

export type CliCommand = { kind: 'help' } | { kind: 'version' } | { kind: 'serve'; config: ServerConfig };

/** A bad flag, value or environment variable: the CLI prints the message and exits 2. */
export class UsageError extends Error {
  override readonly name = 'UsageError';
}

export const DEFAULTS: ServerConfig = { host: '127.0.0.1', port: 8080, broker: 'mem://' };

const OPTIONS = {
  port: { type: 'string', short: 'p' },
  host: { type: 'string' },
  broker: { type: 'string', short: 'b' },
  'grpc-port': { type: 'string' },
  help: { type: 'boolean', short: 'h' },
  version: { type: 'boolean' },
} satisfies NonNullable<ParseArgsConfig['options']>;

/** The --help text. */
export function usage(): string {
  const schemes = registeredSchemes().map((s) => `${s}://`).join(' ');
  return `Usage: livepipe [flags]

Streams pub/sub broker messages to browsers over Server-Sent Events.

Flags:
  -p, --port <n>       port to listen on, 0 for any free port (env PORT; default ${DEFAULTS.port})
      --host <addr>    address to listen on (env HOST; default ${DEFAULTS.host})
  -b, --broker <url>   broker URL (default ${DEFAULTS.broker}); schemes: ${schemes}
      --grpc-port <n>  also serve gRPC on this port (cleartext HTTP/2, h2c); Connect and
                       gRPC-Web are always served on the main port
  -h, --help           show this help
      --version        show the version

Endpoints: / (demo page), /events, /update_subscriptions, /publish, /healthz, /readyz, /metrics,
/livepipe.v1.Relay/Stream and /livepipe.v1.Relay/UpdateSubscriptions (Connect, gRPC-Web; gRPC on --grpc-port)`;
}

/** Parses argv (without node and script) and the environment; flags win over PORT / HOST. Throws UsageError. */
export function parseCli(argv: string[], env: NodeJS.ProcessEnv = {}): CliCommand {
  let values: { port?: string; host?: string; broker?: string; 'grpc-port'?: string; help?: boolean; version?: boolean };
  try {
    values = parseArgs({ args: argv, options: OPTIONS, strict: true, allowPositionals: false }).values;
  } catch (err) {
    throw new UsageError(describeParseError(argv, err));
  }
  if (values.help) return { kind: 'help' };
  if (values.version) return { kind: 'version' };
  return {
    kind: 'serve',
    config: {
      port: values.port !== undefined ? parsePort(values.port, '--port') : env.PORT !== undefined ? parsePort(env.PORT, 'PORT') : DEFAULTS.port,
      host: values.host !== undefined ? parseHost(values.host, '--host') : env.HOST !== undefined ? parseHost(env.HOST, 'HOST') : DEFAULTS.host,
      broker: values.broker !== undefined ? parseBroker(values.broker) : DEFAULTS.broker,
      ...(values['grpc-port'] !== undefined ? { grpcPort: parsePort(values['grpc-port'], '--grpc-port') } : {}),
    },
  };
}

function parsePort(value: string, name: string): number {
  if (!/^\d+$/.test(value)) throw new UsageError(`${name}: ${JSON.stringify(value)} is not a port number (expected 0 to 65535)`);
  const port = Number(value);
  if (port > 65535) throw new UsageError(`${name}: ${value} is out of range (expected 0 to 65535)`);
  return port;
}

function parseHost(value: string, name: string): string {
  if (value.trim() === '') throw new UsageError(`${name}: the address is empty (expected e.g. 127.0.0.1, ::1 or localhost)`);
  // Accept the bracketed form people copy from URLs.
  return /^\[.*\]$/.test(value) ? value.slice(1, -1) : value;
}

function parseBroker(value: string): string {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new UsageError(`--broker: ${JSON.stringify(value)} is not a URL (expected e.g. mem:// or nats://127.0.0.1:4222)`);
  }
  const scheme = url.protocol.replace(/:$/, '').toLowerCase();
  const known = registeredSchemes();
  if (!known.includes(scheme)) {
    throw new UsageError(`--broker: no broker driver for ${scheme}:// (known: ${known.map((s) => `${s}://`).join(', ')})`);
  }
  return value;
}

/** Names the first bad argument; parseArgs' own messages can span lines and do not say what to do. */
function describeParseError(argv: string[], err: unknown): string {
  const { tokens } = parseArgs({ args: argv, options: OPTIONS, strict: false, allowPositionals: true, tokens: true });
  for (const token of tokens) {
    if (token.kind === 'positional') return `${JSON.stringify(token.value)}: unexpected argument, livepipe takes only flags (see livepipe --help)`;
    if (token.kind !== 'option') continue;
    const spec = (OPTIONS as Record<string, { type: 'string' | 'boolean' }>)[token.name];
    if (spec === undefined) return `${token.rawName}: unknown flag (see livepipe --help)`;
    if (spec.type === 'boolean' && token.value !== undefined) return `${token.rawName}: takes no value`;
    if (spec.type === 'string' && token.value === undefined) return `${token.rawName}: needs a value`;
    if (spec.type === 'string' && !token.inlineValue && token.value?.startsWith('-')) {
      return `${token.rawName}: needs a value, got the flag ${token.value} (write ${token.rawName}=${token.value} if that is the value)`;
    }
  }
  return String((err as Error).message).split('\n')[0]!;
}

/**
 * What the server allows without further configuration. On loopback only the local machine
 * can connect, so any origin may use the endpoints (as gochan allowed) and the in-memory
 * broker accepts HTTP publishing for the demo; anywhere else both stay off.
 */
export function serverPolicy(config: Pick<ServerConfig, 'host' | 'broker'>): { cors: CorsOptions | false; publish: boolean } {
  const loopback = isLoopbackHost(config.host);
  const mem = new URL(config.broker).protocol.toLowerCase() === 'mem:';
  return { cors: loopback ? { origins: '*' } : false, publish: loopback && mem };
}
