import { RelayError } from '../errors.ts';

/**
 * The driver interface, after the Go CDK's pubsub drivers: a broker is a tiny surface —
 * subscribe a topic, publish a body, close — and each driver is one file chosen by URL scheme.
 */

/** Receives one broker subscription's traffic. Calls arrive in the broker's delivery order. */
export interface SubscriptionListener {
  /**
   * One message body, exactly as the broker carried it. `position` is where the broker keeps it,
   * for a driver with `replay` (a JetStream stream sequence): increasing, comparable across topics.
   */
  message(body: Uint8Array, position?: number): void;
  /** The subscription broke (connection lost, server restarted, permission revoked). The driver keeps retrying. */
  error(error: RelayError): void;
  /** Delivery resumed after `error`; messages published in between may be lost. */
  recovered(): void;
}

export interface BrokerSubscription {
  /** Stops delivery; resolves once the broker-side subscription is gone. Idempotent. */
  close(): Promise<void>;
}

export interface Broker {
  /** The URL scheme this driver serves, e.g. `nats`. */
  readonly scheme: string;
  /**
   * Why this broker cannot represent `topic` (a message naming the rule), or undefined.
   * Called only for topics that already pass PROTOCOL.md section 1.
   */
  topicProblem(topic: string): string | undefined;
  /**
   * Subscribes `topic`; resolves once the broker will deliver every message published after
   * this point. Rejects with a RelayError (`invalid-topic`, `subscription-failure`, …).
   */
  subscribe(topic: string, listener: SubscriptionListener): Promise<BrokerSubscription>;
  /** Publishes one message; resolves once the broker accepted it. */
  publish(topic: string, body: Uint8Array): Promise<void>;
  /** True while the broker connection is usable (for /readyz). */
  isConnected(): boolean;
  /** Closes every subscription and removes every broker-side resource this instance created. */
  close(): Promise<void>;
  /**
   * Carries livepipe's own node-to-node messages when relays scale out (src/scaleout): topics
   * under `livepipe-control.`, at most once, nothing retained, nothing created that outlives
   * this connection. Undefined where the driver cannot carry them that way (yet).
   */
  readonly control?: ControlBus | undefined;
  /**
   * True for a driver whose readers compete for messages (each goes to one of several relays,
   * like an SQS queue): it cannot carry node-to-node messages, which every node must get.
   */
  readonly competingReaders?: boolean;
  /**
   * For a broker that keeps history (NATS JetStream, Redis streams): the messages it still
   * holds on `topics` after `position` (the position of the client's last message, which was on
   * `lastTopic` when known), oldest first, at most `limit`. Where positions of two topics can
   * tie (Redis), those tied with `position` on other topics are included: a duplicate rather
   * than a loss. `complete` is false when some may be missing (expired, trimmed, past the
   * limit). A node uses it to resume a session whose node died.
   */
  replay?(topics: string[], position: number, limit: number, lastTopic?: string): Promise<BrokerReplay>;
}

export interface BrokerReplay {
  messages: Array<{ topic: string; body: Uint8Array; position: number }>;
  complete: boolean;
}

/** Plain publish/subscribe, for messages between relays rather than to clients. */
export type ControlBus = Pick<Broker, 'subscribe' | 'publish'>;

export interface BrokerOptions {
  /** Called for events worth logging (reconnects, errors), with a short message. */
  log?: (level: 'info' | 'warn' | 'error', message: string, details?: Record<string, unknown>) => void;
}

export type BrokerOpener = (url: URL, options: BrokerOptions) => Promise<Broker>;

const loaders = new Map<string, () => Promise<BrokerOpener>>();

/** Makes `scheme://…` URLs open with `opener`. A later registration replaces an earlier one. */
export function registerBroker(scheme: string, opener: BrokerOpener): void {
  registerBrokerLoader(scheme, async () => opener);
}

/** Like registerBroker, but the driver module (and its client library) loads on first use. */
export function registerBrokerLoader(scheme: string, load: () => Promise<BrokerOpener>): void {
  loaders.set(scheme.replace(/:$/, '').toLowerCase(), load);
}

export function registeredSchemes(): string[] {
  return [...loaders.keys()].sort();
}

/** Opens a broker from its URL, e.g. `mem://`, `nats://127.0.0.1:4222`. */
export async function openBroker(url: string | URL, options: BrokerOptions = {}): Promise<Broker> {
  let parsed: URL;
  try {
    parsed = typeof url === 'string' ? new URL(url) : url;
  } catch {
    throw new RelayError('bad-request', `broker URL ${JSON.stringify(String(url))} is not a URL (expected e.g. mem:// or nats://host:4222)`);
  }
  const scheme = parsed.protocol.replace(/:$/, '').toLowerCase();
  const load = loaders.get(scheme);
  if (load === undefined) {
    throw new RelayError('bad-request', `no broker driver for ${scheme}:// (known: ${registeredSchemes().map((s) => `${s}://`).join(', ')})`);
  }
  const open = await load();
  return open(parsed, options);
}

/**
 * Imports a driver's client library, an optional peer dependency, with an error that names
 * the package to install when it is missing.
 */
export async function importPeer<T>(pkg: string, scheme: string): Promise<T> {
  try {
    return (await import(pkg)) as T;
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code === 'ERR_MODULE_NOT_FOUND' && String((err as Error).message).includes(pkg)) {
      throw new RelayError('missing-client', `the ${scheme}:// broker needs the npm package ${pkg}; install it with: npm install ${pkg}`, { cause: err });
    }
    throw err;
  }
}

const RETRY_MAX_MS = 10_000;

/** Waits before retry number `attempt` (from 1) of a failed broker call: 500 ms, doubling, at most 10 s. */
export function backoff(attempt: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, Math.min(250 * 2 ** attempt, RETRY_MAX_MS)));
}
