import { createPublicKey } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { isMap, isScalar, isSeq, parseDocument, stringify } from 'yaml';
import { z } from 'zod';
import { registeredSchemes } from '../brokers/index.ts';
import { resolveOptions, type AuthOptions, type CorsOptions, type LimitOptions, type RelayOptions, type RelayPaths } from '../options.ts';
import type { ServerConfig } from './args.ts';

/**
 * The config file of `livepipe --config livepipe.yaml`: one flat YAML mapping whose keys are
 * the server's (host, port, broker, …) and the library's own option names (the keys of
 * createRelay's options, minus broker), validated by one schema so that every mistake is
 * reported as `<key path>: <rule>`. String values may use `${VAR}` and `${VAR:-default}`.
 */

/** Library options, as a config file gives them (`tracer` is an object the server builds from `tracing`). */
export type FileRelayOptions = Omit<RelayOptions, 'broker' | 'tracer'>;

/** What a config file sets: server keys, and the library's under `relay`. */
export type FileConfig = Partial<Omit<ServerConfig, 'relay'>> & { relay: FileRelayOptions };

/** A problem with the config file; the message is one line, `config <file>: <key path>: <rule>`. */
export class ConfigError extends Error {
  override readonly name = 'ConfigError';
}

// ---------------------------------------------------------------------------------------------
// The schema. Each leaf is described by the rule it enforces; the error map below turns any
// failure into "expected <rule>, got <value>".

/** Schemas whose values are never echoed in errors (printConfig masks them separately). */
const SECRET = new WeakSet<z.core.$ZodType>();
function secret<T extends z.ZodType>(schema: T): T {
  SECRET.add(schema);
  return schema;
}

/** The longest delay node's timers take; a longer one fires after 1 ms instead. */
const MAX_TIMER_MS = 2_147_483_647;

const text = () => z.string().min(1).describe('a non-empty string');
const bool = () => z.boolean().describe('true or false');
const positiveInt = () => z.number().int().positive().describe('a whole number of at least 1');
const count = () => z.number().int().nonnegative().describe('a whole number of at least 0');
const ms = () => z.number().int().min(0).max(MAX_TIMER_MS).describe(`a duration in ms, a whole number from 0 to ${MAX_TIMER_MS}`);
const positiveMs = () => z.number().int().min(1).max(MAX_TIMER_MS).describe(`a duration in ms, a whole number from 1 to ${MAX_TIMER_MS}`);
const port = () => z.number().int().min(0).max(65535).describe('a port number from 0 to 65535');
const list = <T extends z.ZodType>(item: T) => z.array(item).describe('a list');
const mapping = <T extends z.core.$ZodLooseShape>(shape: T) => z.strictObject(shape).describe('a mapping of keys');
const oneOf = <const T extends readonly [string, ...string[]]>(values: T) => z.enum(values).describe(`one of ${values.join(', ')}`);
const httpUrl = () =>
  z
    .string()
    .refine((value) => /^https?:$/.test(URL.parse(value)?.protocol ?? ''))
    .describe('an http:// or https:// URL');

const path = () => z.string().regex(/^\/\S*$/).describe('a URL path starting with /');
// Browsers send Origin as scheme://host[:port]; anything else never matches.
const origin = () =>
  z
    .string()
    .refine((value) => URL.parse(value)?.origin === value)
    .describe('an origin: scheme://host[:port], without a path or trailing slash');

/** The rule a broker URL breaks, if any (shared with the --broker flag). */
export function brokerProblem(value: string): string | undefined {
  const url = URL.parse(value);
  if (url === null) return 'expected a broker URL, e.g. mem:// or nats://127.0.0.1:4222';
  const scheme = url.protocol.replace(/:$/, '').toLowerCase();
  const known = registeredSchemes();
  if (!known.includes(scheme)) return `no broker driver for ${scheme}:// (known: ${known.map((s) => `${s}://`).join(', ')})`;
  return undefined;
}

const broker = () =>
  secret(
    z
      .string()
      .superRefine((value, ctx) => {
        const problem = brokerProblem(value);
        if (problem !== undefined) ctx.addIssue({ code: 'custom', message: problem });
      })
      .describe('a broker URL'),
  );

const HMAC = ['HS256', 'HS384', 'HS512'];
const ASYMMETRIC = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512', 'EdDSA', 'Ed25519'];

const rate = () => mapping({ perSecond: z.number().positive().describe('a positive number'), burst: positiveInt() });

// The same rules src/auth.ts enforces at createRelay, checked here so that the CLI names the key
// and exits 2 before it opens the broker.
const jwt = mapping({
  secret: secret(
    z
      .string()
      .refine((value) => Buffer.byteLength(value) >= 32)
      .describe('a secret of at least 32 bytes (HS256 needs a 256-bit key, RFC 7518 section 3.2)'),
  ).optional(),
  publicKey: z
    .string()
    .refine((value) => {
      try {
        createPublicKey(value);
        return true;
      } catch {
        return false;
      }
    })
    .describe('a PEM public key (-----BEGIN PUBLIC KEY-----)')
    .optional(),
  jwksUrl: httpUrl().optional(),
  algorithms: list(oneOf([...HMAC, ...ASYMMETRIC] as [string, ...string[]])).optional(),
  issuer: text().optional(),
  audience: z.union([text(), list(text())]).describe('a string or a list of strings').optional(),
  claim: text().optional(),
  clockToleranceSec: z.number().nonnegative().describe('a number of seconds, at least 0').optional(),
}).superRefine((jwt, ctx) => {
  const keys = (['secret', 'publicKey', 'jwksUrl'] as const).filter((key) => jwt[key] !== undefined);
  if (keys.length !== 1) {
    ctx.addIssue({ code: 'custom', message: `needs exactly one of secret, publicKey or jwksUrl${keys.length > 1 ? ` (got ${keys.join(' and ')})` : ''}` });
    return;
  }
  const fits = jwt.secret !== undefined ? HMAC : ASYMMETRIC;
  jwt.algorithms?.forEach((alg, i) => {
    if (!fits.includes(alg)) {
      ctx.addIssue({ code: 'custom', path: ['algorithms', i], message: `${alg} does not fit ${jwt.secret !== undefined ? 'a shared secret' : 'a public key'} (use ${fits.join(', ')})` });
    }
  });
});

const auth = mapping({
  jwt: jwt.optional(),
  callout: mapping({
    url: httpUrl(),
    timeoutMs: positiveMs().optional(),
    cacheMs: ms().optional(),
    headers: z.record(z.string(), secret(z.string().describe('a string'))).describe('a mapping of header names to values').optional(),
  }).optional(),
  anonymous: mapping({ subscribe: list(text()).optional(), publish: list(text()).optional() }).optional(),
});

const limits = mapping({
  maxConnectionsPerIp: positiveInt().optional(),
  maxSessions: positiveInt().optional(),
  updateRate: rate().optional(),
  publishRate: rate().optional(),
  trustProxy: bool().optional(),
});

const RELAY_SHAPE = {
  paths: mapping({
    events: path().optional(),
    update: path().optional(),
    publish: path().optional(),
    health: path().optional(),
    ready: path().optional(),
    metrics: path().optional(),
    ws: path().optional(),
  })
    .superRefine((paths, ctx) => {
      const seen = new Map<string, string>();
      for (const [name, value] of Object.entries(paths)) {
        const other = seen.get(value);
        if (other !== undefined) ctx.addIssue({ code: 'custom', path: [name], message: `${value} is already the ${other} path` });
        seen.set(value, name);
      }
    })
    .optional(),
  heartbeatMs: positiveMs().optional(),
  retryMs: ms().optional(),
  sessionTtlMs: ms().optional(),
  topicGraceMs: ms().optional(),
  history: mapping({ maxMessages: count().optional(), maxBytes: count().optional(), maxAgeMs: ms().optional() }).optional(),
  outbox: mapping({
    maxMessages: positiveInt().optional(),
    maxBytes: positiveInt().optional(),
    onOverflow: oneOf(['drop-oldest', 'close']).optional(),
    stallTimeoutMs: positiveMs().optional(),
  }).optional(),
  maxTopicsPerSession: positiveInt().optional(),
  maxBodyBytes: positiveInt().optional(),
  publish: z
    .union([z.boolean(), z.literal('loopback'), mapping({ token: secret(text()) })])
    .describe('true, false, loopback, or a mapping { token: <bearer token> }')
    .optional(),
  cors: z
    .union([z.literal(false), mapping({ origins: z.union([z.literal('*'), z.array(origin()).min(1).describe('a list of at least one origin')]).describe('"*" or a list of origins') })])
    .describe('false, or a mapping { origins: [...] }')
    .optional(),
  embedJsonPayloads: bool().optional(),
  auth: auth.optional(),
  limits: limits.optional(),
  scaleOut: z
    .union([z.boolean(), mapping({ heartbeatMs: positiveMs().optional(), requestTimeoutMs: positiveMs().optional() })])
    .describe('true, false, or a mapping { heartbeatMs, requestTimeoutMs }')
    .optional(),
};

const SERVER_SHAPE = {
  host: z
    .string()
    .trim()
    .min(1)
    .describe('an address, e.g. 127.0.0.1, ::1 or 0.0.0.0')
    .transform((host) => (/^\[.*\]$/.test(host) ? host.slice(1, -1) : host)) // the bracketed form copied from URLs
    .optional(),
  port: port().optional(),
  broker: broker().optional(),
  grpcPort: port().optional(),
  workers: positiveInt().optional(),
  tls: mapping({ cert: text().describe('a PEM file path'), key: text().describe('a PEM file path') }).optional(),
  http2: bool().optional(),
  logLevel: oneOf(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).optional(),
  shutdownTimeoutMs: positiveMs().optional(),
  tracing: mapping({ endpoint: httpUrl(), serviceName: text().optional() }).optional(),
};

const FILE_SCHEMA = mapping({ ...SERVER_SHAPE, ...RELAY_SHAPE }).superRefine((config, ctx) => {
  // src/auth.ts refuses this at createRelay: an access_token cookie makes requests credentialed.
  if (config.auth !== undefined && config.cors !== undefined && config.cors !== false && config.cors.origins === '*') {
    ctx.addIssue({ code: 'custom', path: ['cors', 'origins'], message: '"*" cannot be used with auth (credentialed requests need a list of origins)' });
  }
});

// A compile error here means RelayOptions gained (or lost) an option the config file does not know.
type SameKeys<A, B> = [Exclude<keyof A, keyof B>, Exclude<keyof B, keyof A>] extends [never, never] ? true : [Exclude<keyof A, keyof B>, Exclude<keyof B, keyof A>];
type Out<S extends z.core.$ZodLooseShape> = z.output<z.ZodObject<S>>;
type Parsed = Out<typeof RELAY_SHAPE>;
const covered: [
  SameKeys<FileRelayOptions, Parsed>,
  SameKeys<AuthOptions, NonNullable<Parsed['auth']>>,
  SameKeys<NonNullable<AuthOptions['jwt']>, NonNullable<NonNullable<Parsed['auth']>['jwt']>>,
  SameKeys<NonNullable<AuthOptions['callout']>, NonNullable<NonNullable<Parsed['auth']>['callout']>>,
  SameKeys<LimitOptions, NonNullable<Parsed['limits']>>,
  SameKeys<RelayPaths, NonNullable<Parsed['paths']>>,
  SameKeys<CorsOptions, Exclude<NonNullable<Parsed['cors']>, false>>,
  SameKeys<Omit<ServerConfig, 'relay'>, Out<typeof SERVER_SHAPE>>,
] = [true, true, true, true, true, true, true, true];
void covered;
// And what the schema produces must be what createRelay and the server take.
void ((parsed: Parsed): FileRelayOptions => parsed);
void ((parsed: Out<typeof SERVER_SHAPE>): Partial<Omit<ServerConfig, 'relay'>> => parsed);

const SERVER_KEYS = new Set(Object.keys(SERVER_SHAPE));

/** Every key path the file accepts (`auth.jwt.secret`, …), for checking that the example documents them all. */
export function configKeyPaths(): string[] {
  const paths: string[] = [];
  const walk = (schema: z.core.$ZodType, prefix: string): void => {
    const def = schema._zod.def as { type: string; innerType?: z.core.$ZodType; in?: z.core.$ZodType; options?: z.core.$ZodType[]; shape?: Record<string, z.core.$ZodType> };
    if (def.innerType !== undefined) return walk(def.innerType, prefix); // optional
    if (def.type === 'pipe') return walk(def.in!, prefix); // transform
    if (def.type === 'union') return def.options!.forEach((option) => walk(option, prefix));
    if (def.type !== 'object') return;
    for (const [key, child] of Object.entries(def.shape!)) {
      paths.push(`${prefix}${key}`);
      walk(child, `${prefix}${key}.`);
    }
  };
  walk(FILE_SCHEMA, '');
  return paths;
}

// ---------------------------------------------------------------------------------------------
// Error messages

/** Turns a zod issue into "expected <rule>, got <value>" using the rule the schema describes. */
function errorMap(issue: z.core.$ZodRawIssue): string | undefined {
  if (issue.code === 'unrecognized_keys') {
    const shape = (issue.inst as { shape?: Record<string, unknown> } | undefined)?.shape;
    return `unknown key${shape === undefined ? '' : ` (known: ${Object.keys(shape).join(', ')})`}`;
  }
  if (issue.code === 'custom' && typeof issue.message === 'string') return issue.message;
  const owner = (issue.schema ?? issue.inst) as (z.core.$ZodType & { description?: string }) | undefined;
  const rule = owner?.description;
  if (rule === undefined) return undefined;
  if (issue.input === undefined) return `missing (expected ${rule})`;
  return owner !== undefined && SECRET.has(owner) ? `expected ${rule}` : `expected ${rule}, got ${show(issue.input)}`;
}

function show(value: unknown): string {
  if (value === null) return 'nothing (null)';
  if (Array.isArray(value)) return value.length === 0 ? 'an empty list' : 'a list';
  if (typeof value === 'object') return 'a mapping';
  if (typeof value === 'string') {
    const masked = maskUrl(value); // a password in a URL that breaks some other rule
    return JSON.stringify(masked.length > 60 ? `${masked.slice(0, 57)}...` : masked);
  }
  return String(value);
}

/** The issue to report: for a union, the branch the value was meant for when one went deeper than its type. */
function firstIssue(issues: readonly z.core.$ZodIssue[], prefix: PropertyKey[] = []): { path: PropertyKey[]; message: string } {
  // An unknown key is usually a typo, which also explains a "missing" key next to it.
  const issue = issues.find((i) => i.code === 'unrecognized_keys') ?? issues[0]!;
  const path = [...prefix, ...issue.path];
  if (issue.code === 'invalid_union') {
    const deeper = issue.errors.find((branch) => branch.some((i) => i.path.length > 0 || (i.code !== 'invalid_type' && i.code !== 'invalid_value')));
    if (deeper !== undefined) return firstIssue(deeper, path);
  }
  if (issue.code === 'unrecognized_keys') return { path: [...path, issue.keys[0]!], message: issue.message };
  return { path, message: issue.message };
}

/** `a.b[0].c`; keys that are not plain names are quoted. */
function keyPath(path: readonly PropertyKey[]): string {
  let out = '';
  for (const key of path) {
    if (typeof key === 'number') out += `[${key}]`;
    else if (/^[A-Za-z_][\w-]*$/.test(String(key))) out += `${out === '' ? '' : '.'}${String(key)}`;
    else out += `[${JSON.stringify(String(key))}]`;
  }
  return out;
}

/** Validates the parsed file; throws "<key path>: <rule>" (the caller names the file). */
function validate<T extends z.ZodType>(schema: T, value: unknown): z.output<T> {
  const result = schema.safeParse(value, { error: errorMap });
  if (result.success) return result.data;
  const { path, message } = firstIssue(result.error.issues);
  throw new ConfigError(`${path.length === 0 ? 'top level' : keyPath(path)}: ${message}`);
}

/** Validates one server field given by a flag; returns the rule it breaks, or the value. */
export function checkField<K extends keyof typeof SERVER_SHAPE>(key: K, value: unknown): { value: z.output<(typeof SERVER_SHAPE)[K]> } | { problem: string } {
  const result = SERVER_SHAPE[key].safeParse(value, { error: errorMap });
  return result.success ? { value: result.data as z.output<(typeof SERVER_SHAPE)[K]> } : { problem: firstIssue(result.error.issues).message };
}

// ---------------------------------------------------------------------------------------------
// Loading

/**
 * Reads, interpolates and validates a config file. Relative TLS paths are taken from the
 * file's directory, so the file means the same wherever livepipe is started.
 */
export function loadConfigFile(file: string, env: NodeJS.ProcessEnv): FileConfig {
  const fail = (message: string): never => {
    throw new ConfigError(`config ${file}: ${message}`);
  };
  let source: string;
  try {
    source = readFileSync(file, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'permission denied' : code === 'EISDIR' ? 'it is a directory' : (err as Error).message;
    return fail(`cannot read the file (${why})`);
  }
  const doc = parseDocument(source, { prettyErrors: true });
  const syntax = doc.errors[0];
  if (syntax !== undefined) {
    const at = syntax.linePos?.[0];
    const what = syntax.message.split('\n')[0]!.replace(/ at line \d+, column \d+:?$/, '');
    return fail(`${at === undefined ? '' : `line ${at.line}, column ${at.col}: `}invalid YAML: ${what}`);
  }
  try {
    interpolateNode(doc.contents, [], env);
  } catch (err) {
    return fail((err as Error).message);
  }
  let data: unknown;
  try {
    data = doc.toJS({ maxAliasCount: 100 }) ?? {}; // an empty file sets nothing
  } catch (err) {
    return fail(`invalid YAML: ${(err as Error).message}`); // an undefined alias, or too many of them
  }
  let parsed: z.output<typeof FILE_SCHEMA>;
  try {
    parsed = validate(FILE_SCHEMA, data);
  } catch (err) {
    return fail((err as Error).message);
  }
  const config: Record<string, unknown> = {};
  const relay: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(parsed)) (SERVER_KEYS.has(key) ? config : relay)[key] = value;
  if (parsed.tls !== undefined) {
    const base = dirname(resolve(file));
    config.tls = { cert: resolve(base, parsed.tls.cert), key: resolve(base, parsed.tls.key) };
  }
  return { ...(config as Partial<Omit<ServerConfig, 'relay'>>), relay: relay as FileRelayOptions };
}

/** Replaces `${VAR}` / `${VAR:-default}` in the string scalars under `node`, in place. */
function interpolateNode(node: unknown, path: PropertyKey[], env: NodeJS.ProcessEnv): void {
  if (isMap(node)) {
    for (const pair of node.items) interpolateNode(pair.value, [...path, String(isScalar(pair.key) ? pair.key.value : pair.key)], env);
  } else if (isSeq(node)) {
    node.items.forEach((item, i) => interpolateNode(item, [...path, i], env));
  } else if (isScalar(node) && typeof node.value === 'string' && node.value.includes('${')) {
    const value = interpolate(node.value, env, path);
    // An unquoted value is read as if the variable's text had been written there, so
    // `port: ${PORT}` is a number; quote it ("${PORT}") to keep a string.
    node.value = node.type === 'PLAIN' ? retype(value) : value;
  }
}

function interpolate(value: string, env: NodeJS.ProcessEnv, path: PropertyKey[]): string {
  const where = path.length === 0 ? '' : `${keyPath(path)}: `;
  return value.replace(/\$(\$)?\{([^}]*)(\}?)/g, (whole, escaped: string | undefined, inner: string, close: string) => {
    if (close === '') throw new Error(`${where}unterminated ${whole} (expected \${NAME} or \${NAME:-default}; write $\${ for a literal \${)`);
    if (escaped !== undefined) return `\${${inner}}`; // $${X} is the literal text ${X}
    const match = /^([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?$/s.exec(inner);
    if (match === null || match[2]?.includes('${')) {
      throw new Error(`${where}bad reference ${whole} (expected \${NAME} or \${NAME:-default}; write $\${ for a literal \${)`);
    }
    const [, name, fallback] = match as unknown as [string, string, string | undefined];
    const set = env[name];
    if (fallback !== undefined) return set === undefined || set === '' ? fallback : set;
    if (set === undefined) throw new Error(`${where}environment variable ${name} is not set (set it, or give a default: \${${name}:-value})`);
    return set;
  });
}

function retype(value: string): string | number | boolean {
  if (/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(value)) return Number(value);
  if (value === 'true' || value === 'false') return value === 'true';
  return value;
}

// ---------------------------------------------------------------------------------------------
// --print-config

/** Server values used where the config leaves a key unset (shown by --print-config). */
export const SERVER_DEFAULTS = { workers: 1, http2: false, logLevel: 'info', shutdownTimeoutMs: 10_000 } as const;

const MASK = '***';

/**
 * The effective configuration as YAML, defaults filled in, secrets masked (the JWT secret, the
 * publish token, callout headers, passwords in URLs). It is itself a valid config file, except
 * that masked secrets would fail their rules rather than run with a wrong value.
 */
export function formatConfig(config: ServerConfig, relay: FileRelayOptions): string {
  const resolved = resolveOptions({ broker: config.broker, ...relay }) as unknown as Record<string, unknown>;
  const out: Record<string, unknown> = {
    host: config.host,
    port: config.port,
    broker: maskUrl(config.broker),
    ...(config.grpcPort === undefined ? {} : { grpcPort: config.grpcPort }),
    workers: config.workers ?? SERVER_DEFAULTS.workers,
    ...(config.tls === undefined ? {} : { tls: config.tls }),
    http2: config.http2 ?? SERVER_DEFAULTS.http2,
    logLevel: config.logLevel ?? SERVER_DEFAULTS.logLevel,
    shutdownTimeoutMs: config.shutdownTimeoutMs ?? SERVER_DEFAULTS.shutdownTimeoutMs,
    ...(config.tracing === undefined ? {} : { tracing: { ...config.tracing, endpoint: maskUrl(config.tracing.endpoint) } }),
  };
  for (const key of Object.keys(RELAY_SHAPE)) {
    const value = key in resolved ? resolved[key] : (relay as Record<string, unknown>)[key];
    if (value !== undefined) out[key] = value;
  }
  if (typeof out.publish === 'object' && out.publish !== null) out.publish = { token: MASK };
  if (relay.auth !== undefined) out.auth = maskAuth(relay.auth);
  return `# livepipe: the effective configuration (secrets masked as ${MASK})\n${stringify(out)}`;
}

function maskAuth(auth: AuthOptions): AuthOptions {
  return {
    ...auth,
    ...(auth.jwt === undefined ? {} : { jwt: { ...auth.jwt, ...(auth.jwt.secret === undefined ? {} : { secret: MASK }) } }),
    ...(auth.callout === undefined
      ? {}
      : {
          callout: {
            ...auth.callout,
            url: maskUrl(auth.callout.url),
            ...(auth.callout.headers === undefined ? {} : { headers: Object.fromEntries(Object.keys(auth.callout.headers).map((name) => [name, MASK])) }),
          },
        }),
  };
}

/** A URL without its password or secret-looking query parameters. */
export function maskUrl(value: string): string {
  const url = URL.parse(value);
  if (url === null) return value;
  let changed = false;
  if (url.password !== '') {
    url.password = MASK;
    changed = true;
  }
  for (const name of [...url.searchParams.keys()]) {
    if (/pass|secret|token|key|signature|credential/i.test(name)) {
      url.searchParams.set(name, MASK);
      changed = true;
    }
  }
  // Only re-serialize when something was masked: URL normalizes (mem:// stays mem://).
  return changed ? url.toString() : value;
}
