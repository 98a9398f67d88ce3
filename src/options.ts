import type { Broker } from './brokers/broker.ts';
import type { OutboxLimits } from './connection.ts';
import type { HistoryLimits } from './history.ts';

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
   */
  publish?: PublishSetting;
  /** CORS; off unless set (the CLI allows any origin on a loopback listener). */
  cors?: CorsOptions | false;
  /** Put bodies that are valid JSON into `payload` as JSON values instead of strings. */
  embedJsonPayloads?: boolean;
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
  };
}
