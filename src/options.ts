import type { Broker } from './brokers/broker.ts';
import type { OutboxLimits } from './connection.ts';
import type { HistoryLimits } from './history.ts';
import type { RelayTracer } from './tracer.ts';

export type PublishSetting = boolean | 'loopback' | { token: string };

export interface RelayPaths {
  events: string;
  update: string;
  publish: string;
  health: string;
  ready: string;
  metrics: string;
  /** The WebSocket endpoint (an Upgrade request; see `relay.handleUpgrade`). */
  ws: string;
}

export interface CorsOptions {
  /** Origins allowed to use the endpoints, or '*' for any (then without credentials). */
  origins: '*' | string[];
}

/**
 * Authorization (PROTOCOL.md section 6; src/auth.ts). With `auth` set, every stream, update and
 * publish needs a bearer token (or the anonymous grants); without it, the relay is open. A
 * stream authenticates once, when it opens; a session then answers only to the identity that
 * opened it (the token's `sub`, or the token's SHA-256 when it has none). Refusals are 403
 * `forbidden`. Needs an explicit `cors.origins` list (never '*'): listed origins get
 * `Access-Control-Allow-Credentials` so that pages can send the cookie.
 */
export interface AuthOptions {
  /**
   * Bearer JWTs, from `Authorization: Bearer`, the `access_token` query parameter, or the
   * `access_token` cookie (streams and updates only: `POST /publish` ignores the cookie, which
   * any site could make a browser send). Exactly one of secret, publicKey, jwksUrl.
   */
  jwt?: {
    /** HMAC shared secret (HS256; HS384 and HS512 too), at least 32 bytes. */
    secret?: string;
    /** PEM public key (SPKI): RSA for RS256 (RS384, RS512), EC P-256 for ES256 (P-384, P-521), Ed25519. */
    publicKey?: string;
    /** A JWKS URL, fetched on first use and cached; a token with an unknown `kid` fetches it again (at most every 30 s). */
    jwksUrl?: string;
    /** Accepted algorithms; defaults to those the key allows (never `none`). */
    algorithms?: string[];
    /** Required `iss`. */
    issuer?: string;
    /** Required `aud` (one of them). */
    audience?: string | string[];
    /**
     * The claim holding `{ "subscribe": [patterns], "publish": [patterns] }`; default `livepipe`.
     * A pattern is a topic, or a topic with `*` standing for any run of characters.
     */
    claim?: string;
    /** Allowed clock skew for `exp` and `nbf`, in seconds; default 0. */
    clockToleranceSec?: number;
  };
  /**
   * Asks the app's backend about topics the token's claims (and the anonymous grants) do not
   * grant: POST `url` with `{ identity, action: 'subscribe'|'publish', topics }`, the bearer
   * forwarded as `Authorization` and `headers` added; expects `{ allow: [topics] }`. Answers are
   * cached per identity, action and topic for `cacheMs` (default 10000); a backend that fails or
   * takes longer than `timeoutMs` (default 3000) denies. Without `jwt`, tokens are opaque and the
   * callout alone judges them. Requests without a token are not asked about.
   */
  callout?: { url: string; timeoutMs?: number; cacheMs?: number; headers?: Record<string, string> };
  /** What a request without a token may do (and a bearer too, on top of its own grants); nothing unless set. */
  anonymous?: { subscribe?: string[]; publish?: string[] };
}

/**
 * Caps and rate limits that protect the relay from one client or address (src/limits.ts). Each
 * refusal is 429 `rate-limited` with a message naming the limit (HTTP rate limits add
 * Retry-After; a refused WebSocket stream closes with 1013) and changes nothing.
 */
export interface LimitOptions {
  /**
   * Open streams (SSE, WebSocket, RPC together) per client address. A resume from the address
   * that holds the session's current stream takes over that stream's slot. The fetch handler
   * knows the address only when told (see FetchHandler) or via trustProxy.
   */
  maxConnectionsPerIp?: number;
  /** Live sessions in this process (attached or within their TTL); resumes are never refused by it. */
  maxSessions?: number;
  /** Subscription updates per session (HTTP, WebSocket frames and RPC alike): a token bucket of `burst` refilled at `perSecond`. */
  updateRate?: { perSecond: number; burst: number };
  /** HTTP publishes per client address: a token bucket of `burst` refilled at `perSecond`. */
  publishRate?: { perSecond: number; burst: number };
  /**
   * Take the client address from the first X-Forwarded-For entry. Only behind a proxy you trust
   * that sets the header itself, replacing what the client sent (nginx: `proxy_set_header
   * X-Forwarded-For $remote_addr`); a proxy that appends lets clients pick their own address.
   */
  trustProxy?: boolean;
}

export interface RelayOptions {
  /** A broker URL (`mem://`, `nats://…`) or an opened Broker. A relay closes a broker it opened itself. */
  broker: string | Broker;
  /** Endpoint paths; the defaults are those of PROTOCOL.md. */
  paths?: Partial<RelayPaths>;
  /** Longest silence on a stream before a keep-alive comment, in ms. */
  heartbeatMs?: number;
  /** Reconnect delay sent to clients in the `retry:` line, in ms. */
  retryMs?: number;
  /** How long a session outlives its last connection, in ms. */
  sessionTtlMs?: number;
  /** How long a topic's broker subscription outlives its last session, in ms. */
  topicGraceMs?: number;
  /** Per-topic replay history for resume (age defaults to the session TTL). */
  history?: Partial<HistoryLimits>;
  /** Per-connection bound on pending output for slow readers. */
  outbox?: Partial<OutboxLimits>;
  /** Most topics one session may hold. */
  maxTopicsPerSession?: number;
  /** Largest request body accepted by update_subscriptions and publish, in bytes. */
  maxBodyBytes?: number;
  /**
   * `POST /publish`: true, false, a bearer token that publishers must send, or 'loopback'
   * (allowed for requests that arrive on a loopback address). The default is 'loopback' for
   * the in-memory broker and false for any other. The fetch handler cannot see the listener,
   * so there 'loopback' refuses: set true or a token.
   * With `auth`: the default is true, and a bearer needs a publish grant for the topic (JWT
   * claim, anonymous grant or callout); false still disables the endpoint, 'loopback' still
   * requires a loopback listener, and a `{ token }` publishes on any topic (a backend's key)
   * while other bearers need grants.
   */
  publish?: PublishSetting;
  /** CORS; off unless set (the CLI allows any origin on a loopback listener). */
  cors?: CorsOptions | false;
  /** Put bodies that are valid JSON into `payload` as JSON values instead of strings. */
  embedJsonPayloads?: boolean;
  /** Authorization (PROTOCOL.md section 6); open when unset. */
  auth?: AuthOptions;
  /** Caps and rate limits; none when unset (except maxTopicsPerSession and maxBodyBytes above). */
  limits?: LimitOptions;
  /**
   * Traces stream opens, subscription updates and publishes: an OpenTelemetry Tracer
   * (`trace.getTracer('livepipe')` from @opentelemetry/api) or anything of its shape. Off when unset.
   */
  tracer?: RelayTracer;
  /**
   * Makes this relay one node of several behind a load balancer, over the same broker (no
   * sticky sessions; src/scaleout/peers.ts): true, or the node-to-node timings. Off when unset.
   */
  scaleOut?: boolean | ScaleOutOptions;
}

export interface ScaleOutOptions {
  /** How often a node tells the others it is alive, in ms (default 1000); one silent for three of these is taken for gone. */
  heartbeatMs?: number;
  /** How long a node waits for another's answer (a hand-over, a forwarded update), in ms (default 2000). */
  requestTimeoutMs?: number;
  /** Told about trouble between nodes (malformed messages, an interrupted control bus, a failed hand-over). */
  log?: (level: 'info' | 'warn' | 'error', message: string, details?: Record<string, unknown>) => void;
}

export interface ResolvedOptions {
  paths: RelayPaths;
  heartbeatMs: number;
  retryMs: number;
  sessionTtlMs: number;
  topicGraceMs: number;
  history: HistoryLimits;
  outbox: OutboxLimits;
  maxTopicsPerSession: number;
  maxBodyBytes: number;
  publish: PublishSetting | undefined;
  cors: CorsOptions | false;
  embedJsonPayloads: boolean;
  limits: LimitOptions;
  tracer: RelayTracer | undefined;
  scaleOut: ScaleOutOptions | undefined;
}

export const DEFAULT_PATHS: RelayPaths = {
  events: '/events',
  update: '/update_subscriptions',
  publish: '/publish',
  health: '/healthz',
  ready: '/readyz',
  metrics: '/metrics',
  ws: '/ws',
};

export function resolveOptions(options: RelayOptions): ResolvedOptions {
  const sessionTtlMs = options.sessionTtlMs ?? 60_000;
  return {
    paths: { ...DEFAULT_PATHS, ...options.paths },
    heartbeatMs: options.heartbeatMs ?? 15_000,
    retryMs: options.retryMs ?? 2_000,
    sessionTtlMs,
    topicGraceMs: options.topicGraceMs ?? 2_000,
    history: {
      maxMessages: 1_000,
      maxBytes: 8 * 1024 * 1024,
      maxAgeMs: sessionTtlMs,
      ...options.history,
    },
    outbox: {
      maxMessages: 1_000,
      maxBytes: 1024 * 1024,
      onOverflow: 'drop-oldest',
      stallTimeoutMs: 60_000,
      ...options.outbox,
    },
    maxTopicsPerSession: options.maxTopicsPerSession ?? 256,
    maxBodyBytes: options.maxBodyBytes ?? 1024 * 1024,
    publish: options.publish,
    cors: options.cors ?? false,
    embedJsonPayloads: options.embedJsonPayloads ?? false,
    limits: options.limits ?? {},
    tracer: options.tracer,
    scaleOut: options.scaleOut === true ? {} : options.scaleOut || undefined,
  };
}
