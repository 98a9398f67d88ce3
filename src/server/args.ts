import { parseArgs, type ParseArgsConfig } from 'node:util';
import { registeredSchemes } from '../brokers/index.ts';
import { isLoopbackHost } from '../net.ts';
import type { CorsOptions, RelayOptions } from '../options.ts';
import { brokerProblem, checkField, ConfigError, formatConfig, loadConfigFile, SERVER_DEFAULTS, type FileConfig } from './config.ts';

export { isLoopbackHost, SERVER_DEFAULTS };

/** Command-line parsing for the standalone server (PROTOCOL.md section 7). */

export interface ServerConfig {
  host: string;
  port: number;
  /** A broker URL whose scheme has a registered driver. */
  broker: string;
  /** Port of a cleartext HTTP/2 (h2c) listener for gRPC clients, on the same host; none when absent. */
  grpcPort?: number;
  /** Worker processes sharing the port, each with its own broker subscriptions; 1 (the default) serves in this process. */
  workers?: number;
  /** Serve HTTPS with this certificate and key (PEM file paths). */
  tls?: { cert: string; key: string };
  /** With tls: serve HTTP/2 (HTTP/1.1 still accepted), so many SSE streams share one connection. */
  http2?: boolean;
  /** Level of the JSON logs on stdout. */
  logLevel?: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
  /** How long a graceful shutdown may take before the process exits anyway, in ms. */
  shutdownTimeoutMs?: number;
  /** OpenTelemetry traces, exported over OTLP/HTTP; off when absent. */
  tracing?: { endpoint: string; serviceName?: string };
  /** Every library option (auth, limits, cors, publish, history, outbox, …), from the config file. */
  relay?: Omit<RelayOptions, 'broker'>;
}

export type CliCommand = { kind: 'help' } | { kind: 'version' } | { kind: 'serve'; config: ServerConfig } | { kind: 'print-config'; config: ServerConfig };

/** A bad flag, value, environment variable or config file: the CLI prints the message and exits 2. */
export class UsageError extends Error {
  override readonly name = 'UsageError';
}

export const DEFAULTS: ServerConfig = { host: '127.0.0.1', port: 8080, broker: 'mem://' };

const OPTIONS = {
  config: { type: 'string', short: 'c' },
  'print-config': { type: 'boolean' },
  port: { type: 'string', short: 'p' },
  host: { type: 'string' },
  broker: { type: 'string', short: 'b' },
  'grpc-port': { type: 'string' },
  workers: { type: 'string', short: 'w' },
  'tls-cert': { type: 'string' },
  'tls-key': { type: 'string' },
  http2: { type: 'boolean' },
  'log-level': { type: 'string' },
  'shutdown-timeout': { type: 'string' },
  'scale-out': { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
  version: { type: 'boolean' },
} satisfies NonNullable<ParseArgsConfig['options']>;

/** The --help text. */
export function usage(): string {
  const schemes = registeredSchemes().map((s) => `${s}://`).join(' ');
  return `Usage: livepipe [flags]

Streams pub/sub broker messages to browsers over Server-Sent Events.

Flags (each overrides the same setting of the config file):
  -c, --config <file>          YAML config file with every server and library option
                               (see livepipe.example.yaml); \${VAR} and \${VAR:-default} are
                               replaced from the environment
      --print-config           print the effective configuration (secrets masked) and exit
  -p, --port <n>               port to listen on, 0 for any free port (env PORT; default ${DEFAULTS.port})
      --host <addr>            address to listen on (env HOST; default ${DEFAULTS.host})
  -b, --broker <url>           broker URL (default ${DEFAULTS.broker}); schemes: ${schemes}
      --grpc-port <n>          also serve gRPC on this port (cleartext HTTP/2, h2c); Connect and
                               gRPC-Web are always served on the main port
  -w, --workers <n>            worker processes sharing the port (default ${SERVER_DEFAULTS.workers})
      --tls-cert <file>        serve HTTPS with this PEM certificate (needs --tls-key)
      --tls-key <file>         the PEM private key of --tls-cert
      --http2                  serve HTTP/2 (with TLS; HTTP/1.1 is still accepted)
      --log-level <level>      fatal, error, warn, info, debug, trace or silent (default ${SERVER_DEFAULTS.logLevel})
      --shutdown-timeout <ms>  longest graceful shutdown before exiting anyway (default ${SERVER_DEFAULTS.shutdownTimeoutMs})
      --scale-out              one node of several behind a load balancer, over the same broker
                               (scaleOut in the config file sets its timings)
  -h, --help                   show this help
      --version                show the version

Precedence: flags, then PORT / HOST, then the config file, then the defaults.

Endpoints: / (demo page), /events, /update_subscriptions, /publish, /healthz, /readyz, /metrics,
/livepipe.v1.Relay/Stream and /livepipe.v1.Relay/UpdateSubscriptions (Connect, gRPC-Web; gRPC on --grpc-port)`;
}

type Values = { [K in keyof typeof OPTIONS]?: (typeof OPTIONS)[K]['type'] extends 'boolean' ? boolean : string };

/**
 * Parses argv (without node and script), the environment and the --config file into one
 * configuration: flags win over PORT / HOST, which win over the file, which wins over the
 * defaults. Throws UsageError with one line naming the flag, variable or key path.
 */
export function parseCli(argv: string[], env: NodeJS.ProcessEnv = {}): CliCommand {
  let values: Values;
  try {
    values = parseArgs({ args: argv, options: OPTIONS, strict: true, allowPositionals: false }).values;
  } catch (err) {
    throw new UsageError(describeParseError(argv, err));
  }
  if (values.help) return { kind: 'help' };
  if (values.version) return { kind: 'version' };

  let file: FileConfig = { relay: {} };
  if (values.config !== undefined) {
    try {
      file = loadConfigFile(values.config, env);
    } catch (err) {
      if (err instanceof ConfigError) throw new UsageError(err.message);
      throw err;
    }
  }
  const { relay, ...fromFile } = file;
  const flag = <K extends Parameters<typeof checkField>[0]>(name: string, key: K, raw: string | boolean | undefined) => {
    if (raw === undefined) return undefined;
    // Numbers arrive as text; the field's own rule then judges the number.
    const result = checkField(key, typeof raw === 'string' && /^\d+$/.test(raw) ? Number(raw) : raw);
    if ('problem' in result) throw new UsageError(`${name}: ${result.problem}`);
    return result.value;
  };

  const config: ServerConfig = {
    ...fromFile,
    port: values.port !== undefined ? parsePort(values.port, '--port') : env.PORT !== undefined ? parsePort(env.PORT, 'PORT') : (fromFile.port ?? DEFAULTS.port),
    host: values.host !== undefined ? parseHost(values.host, '--host') : env.HOST !== undefined ? parseHost(env.HOST, 'HOST') : (fromFile.host ?? DEFAULTS.host),
    broker: values.broker !== undefined ? parseBroker(values.broker) : (fromFile.broker ?? DEFAULTS.broker),
  };
  const set = <K extends keyof ServerConfig>(key: K, value: ServerConfig[K] | undefined) => {
    if (value !== undefined) config[key] = value;
  };
  set('grpcPort', values['grpc-port'] !== undefined ? parsePort(values['grpc-port'], '--grpc-port') : undefined);
  set('workers', flag('--workers', 'workers', values.workers));
  set('http2', flag('--http2', 'http2', values.http2));
  set('logLevel', flag('--log-level', 'logLevel', values['log-level']));
  set('shutdownTimeoutMs', flag('--shutdown-timeout', 'shutdownTimeoutMs', values['shutdown-timeout']));

  // A flag may replace either half of the file's tls; the pair must be complete in the end.
  const cert = values['tls-cert'] ?? fromFile.tls?.cert;
  const key = values['tls-key'] ?? fromFile.tls?.key;
  for (const [name, value] of [['--tls-cert', values['tls-cert']], ['--tls-key', values['tls-key']]] as const) {
    if (value !== undefined && value.trim() === '') throw new UsageError(`${name}: the file path is empty`);
  }
  if ((cert === undefined) !== (key === undefined)) {
    throw new UsageError(cert === undefined ? '--tls-key: needs a certificate as well (--tls-cert, or tls.cert in the config file)' : '--tls-cert: needs a private key as well (--tls-key, or tls.key in the config file)');
  }
  if (cert !== undefined && key !== undefined) config.tls = { cert, key };
  if (config.http2 === true && config.tls === undefined) {
    throw new UsageError(`${values.http2 ? '--http2' : `config ${values.config}: http2`}: needs TLS (--tls-cert and --tls-key, or tls in the config file); browsers speak HTTP/2 only over TLS`);
  }
  // The flag turns it on; the file's mapping, if any, keeps its timings.
  if (values['scale-out'] && !relay.scaleOut) relay.scaleOut = true;
  if (Object.keys(relay).length > 0) config.relay = relay;
  return { kind: values['print-config'] ? 'print-config' : 'serve', config };
}

/**
 * The library options the server creates its relay with: the config file's, and where it sets
 * no cors / publish, what serverPolicy allows.
 */
export function relayOptions(config: ServerConfig): NonNullable<ServerConfig['relay']> {
  const policy = serverPolicy(config);
  // auth refuses CORS for any origin (its cookie makes requests credentialed): keep same-origin.
  if (config.relay?.auth !== undefined) policy.cors = false;
  return { ...policy, ...config.relay };
}

/** The --print-config output: the effective configuration as YAML, secrets masked. */
export function printConfig(config: ServerConfig): string {
  return formatConfig(config, relayOptions(config));
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
  if (!URL.canParse(value)) throw new UsageError(`--broker: ${JSON.stringify(value)} is not a URL (expected e.g. mem:// or nats://127.0.0.1:4222)`);
  const problem = brokerProblem(value);
  if (problem !== undefined) throw new UsageError(`--broker: ${problem}`);
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
