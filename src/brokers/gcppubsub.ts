import { randomBytes } from 'node:crypto';
import type { Message, PubSub, Subscription, Topic } from '@google-cloud/pubsub';
import { RelayError } from '../errors.ts';
import { importPeer } from './broker.ts';
import type { Broker, BrokerOpener, BrokerOptions, BrokerSubscription, SubscriptionListener } from './broker.ts';
import { restore, TopicEntries } from './topic-entries.ts';
import type { RestorableEntry } from './topic-entries.ts';

/**
 * Google Cloud Pub/Sub: `gcppubsub://<project>` (the Go CDK's scheme). Credentials come from
 * Application Default Credentials; `PUBSUB_EMULATOR_HOST=host:port` points the client at an
 * emulator instead (then set `METADATA_SERVER_DETECTION=none` too, or the Google auth library
 * probes the GCE metadata server on every new channel). Options: `?create_topics=false`.
 *
 * Topics are Pub/Sub topic ids, used as they are: a topic that is not a valid topic id is
 * rejected, never rewritten.
 *
 * Broadcast: each driver instance (relay process) creates its OWN subscription per topic,
 * named `livepipe-<instance>-<n>`, and deletes it on close. A relay that dies without close()
 * leaves it to Pub/Sub's expiration policy (1 day without a subscriber, the service's minimum);
 * it keeps at most 10 minutes of messages meanwhile. A missing topic is created on subscribe
 * (and on publish) unless `?create_topics=false`.
 *
 * Delivery: each message is acked as soon as the listeners have it (at-most-once into the
 * relay). Subscriptions have message ordering on and the driver publishes with the topic as
 * ordering key, so per-topic order holds for messages published that way; other publishers
 * should use one ordering key per topic too (Pub/Sub orders only within an ordering key).
 * A subscription survives a short outage on the Pub/Sub side, so messages published meanwhile
 * arrive after recovery; if it is gone (deleted, or an emulator restarted), it is recreated
 * and messages published before that are lost.
 */

type PubSubModule = typeof import('@google-cloud/pubsub');

// Pub/Sub's own limits: the shortest expiration TTL it accepts, the shortest retention.
const EXPIRATION_TTL_S = 24 * 60 * 60;
const RETENTION_S = 10 * 60;
const RPC_TIMEOUT_MS = 10_000;
const OPTIONS = ['create_topics'];
// gRPC status codes (google-gax re-exports them only as a value import).
const NOT_FOUND = 5;
const ALREADY_EXISTS = 6;
const DEADLINE_EXCEEDED = 4;
const PERMISSION_DENIED = 7;
const UNAVAILABLE = 14;

/** Why `topic` is not a valid Pub/Sub topic id, or undefined. */
export function pubsubTopicProblem(topic: string): string | undefined {
  if (topic.length < 3 || topic.length > 255) return `a Pub/Sub topic id is 3 to 255 characters long (this one is ${topic.length})`;
  if (!/^[A-Za-z]/.test(topic)) return 'a Pub/Sub topic id starts with a letter';
  if (!/^[A-Za-z0-9\-_.~+%]+$/.test(topic)) return 'a Pub/Sub topic id holds only letters, digits and - _ . ~ + %';
  if (topic.startsWith('goog')) return 'a Pub/Sub topic id must not start with "goog"';
  return undefined;
}

export function parseGcpPubSubUrl(url: URL): { projectId: string; createTopics: boolean } {
  const projectId = decodeURIComponent(url.hostname);
  if (projectId === '' || url.pathname.replace(/^\/$/, '') !== '') {
    throw new RelayError('bad-request', `gcppubsub:// needs the project id as host, e.g. gcppubsub://my-project (got ${JSON.stringify(url.href)})`);
  }
  let createTopics = true;
  for (const [key, value] of url.searchParams) {
    if (key === 'create_topics' && (value === 'true' || value === 'false')) createTopics = value === 'true';
    else if (key === 'create_topics') throw new RelayError('bad-request', `gcppubsub:// option create_topics=${JSON.stringify(value)} must be true or false`);
    else throw new RelayError('bad-request', `unknown gcppubsub:// option ${JSON.stringify(key)} (known: ${OPTIONS.join(', ')})`);
  }
  return { projectId, createTopics };
}

const codeOf = (err: unknown): number | undefined => (err as { code?: unknown }).code as number | undefined;
const messageOf = (err: unknown): string => (err instanceof Error ? err.message : String(err));

interface Entry extends RestorableEntry {
  topic: string;
  /** The subscription id, fixed for the life of the entry (recreated under the same id). */
  name: string;
  sub: Subscription | undefined;
  probing: boolean;
}

export class GcpPubSubBroker implements Broker {
  readonly scheme = 'gcppubsub';
  /** Part of every subscription id this instance creates (`livepipe-<instanceId>-<n>`). */
  readonly instanceId = randomBytes(6).toString('hex');
  private readonly entries = new TopicEntries<Entry>();
  private readonly publishers = new Map<string, Topic>();
  private seq = 0;
  /** False after a call failed for want of a connection, until a call succeeds (for isConnected). */
  private reachable = true;
  private closing: Promise<void> | undefined;
  private readonly pubsub: PubSub;
  private readonly createTopics: boolean;
  private readonly log: NonNullable<BrokerOptions['log']>;

  constructor(pubsub: PubSub, createTopics: boolean, log: BrokerOptions['log'] = () => {}) {
    this.pubsub = pubsub;
    this.createTopics = createTopics;
    this.log = log;
  }

  /** One cheap call, so that a wrong endpoint or missing credentials fail open(). */
  async start(): Promise<void> {
    try {
      await this.pubsub.getTopics({ pageSize: 1, autoPaginate: false, gaxOpts: { timeout: RPC_TIMEOUT_MS } });
    } catch (err) {
      if (codeOf(err) === PERMISSION_DENIED) return; // reachable and authenticated; listing is just not granted
      await this.pubsub.close().catch(() => {});
      throw new RelayError('broker-unavailable', `cannot reach Google Cloud Pub/Sub: ${messageOf(err)}`, { cause: err });
    }
  }

  topicProblem(topic: string): string | undefined {
    return pubsubTopicProblem(topic);
  }

  async subscribe(topic: string, listener: SubscriptionListener): Promise<BrokerSubscription> {
    this.check(topic);
    return this.entries.join(topic, listener, {
      create: () => ({
        topic,
        name: `livepipe-${this.instanceId}-${++this.seq}`,
        listeners: new Set(),
        ready: Promise.resolve(),
        sub: undefined,
        failed: false,
        recovering: false,
        probing: false,
        closed: false,
      }),
      // Settles once the subscription exists and is being read (or failed to).
      start: (entry) => this.ensure(entry).then(() => this.listen(entry)),
      failure: (err) => new RelayError('subscription-failure', `cannot subscribe to Pub/Sub topic ${JSON.stringify(topic)}: ${messageOf(err)}`, { topic, cause: err }),
      dispose: (entry) => this.dispose(entry),
    });
  }

  async publish(topic: string, body: Uint8Array): Promise<void> {
    this.check(topic);
    const data = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
    let publisher = this.publishers.get(topic);
    if (publisher === undefined) {
      // Ordering on, with the topic as key: per-topic order for everything this driver publishes.
      publisher = this.pubsub.topic(topic, { messageOrdering: true, batching: { maxMilliseconds: 5 } });
      this.publishers.set(topic, publisher);
    }
    for (let attempt = 1; ; attempt++) {
      try {
        await publisher.publishMessage({ data, orderingKey: topic });
        this.reachable = true;
        return;
      } catch (err) {
        this.noteFailure(err);
        publisher.resumePublishing(topic); // a failed publish pauses its ordering key until resumed
        if (codeOf(err) === NOT_FOUND && this.createTopics && attempt === 1) {
          await this.createTopic(topic).catch(() => {});
          continue;
        }
        const why = codeOf(err) === NOT_FOUND ? `the Pub/Sub topic ${JSON.stringify(topic)} does not exist` : messageOf(err);
        throw new RelayError('broker-unavailable', `Pub/Sub did not accept the message: ${why}`, { topic, cause: err });
      }
    }
  }

  /** Whether Pub/Sub answered the last call (there is no one connection to watch). */
  isConnected(): boolean {
    return this.closing === undefined && this.reachable;
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      await this.entries.disposeAll((entry) => this.dispose(entry));
      await Promise.all([...this.publishers.values()].map((t) => t.flush().catch(() => {})));
      this.publishers.clear();
      await this.pubsub.close().catch(() => {});
    })();
    return this.closing;
  }

  /** Creates the subscription (and, if allowed, its topic). */
  private async ensure(entry: Entry): Promise<void> {
    const create = () =>
      this.pubsub.topic(entry.topic).createSubscription(entry.name, {
        expirationPolicy: { ttl: { seconds: EXPIRATION_TTL_S } },
        messageRetentionDuration: { seconds: RETENTION_S },
        enableMessageOrdering: true,
        gaxOpts: { timeout: RPC_TIMEOUT_MS },
      });
    try {
      await create();
    } catch (err) {
      if (codeOf(err) === ALREADY_EXISTS) return; // recreating after a failure that did not lose it
      if (codeOf(err) !== NOT_FOUND) throw err;
      if (!this.createTopics) {
        throw new RelayError('subscription-failure', `the Pub/Sub topic ${JSON.stringify(entry.topic)} does not exist (and create_topics=false)`, { topic: entry.topic, cause: err });
      }
      await this.createTopic(entry.topic);
      await create();
    }
  }

  private async createTopic(topic: string): Promise<void> {
    try {
      await this.pubsub.createTopic(topic, { timeout: RPC_TIMEOUT_MS });
      this.log('info', 'created Pub/Sub topic', { topic });
    } catch (err) {
      if (codeOf(err) !== ALREADY_EXISTS) throw err;
    }
  }

  /** Starts reading the subscription. */
  private listen(entry: Entry): void {
    if (entry.closed || this.closing !== undefined) return;
    const sub = this.pubsub.subscription(entry.name, {
      streamingOptions: { maxStreams: 1 },
      // Acks leave in batches; a short wait keeps ordered delivery (one unacked message per key) quick.
      batching: { maxMilliseconds: 10 },
      closeOptions: { behavior: 'NACK' },
    });
    sub.on('message', (message: Message) => {
      if (entry.sub !== sub) return;
      this.reachable = true;
      if (entry.failed) this.recovered(entry);
      for (const listener of entry.listeners) listener.message(message.data);
      message.ack();
    });
    // Not retried by the client (subscription deleted, permission revoked): rebuild it ourselves.
    sub.on('error', (err: Error) => this.fail(entry, sub, err));
    // The client retries streams that ended with a retryable status itself. Such endings are
    // also routine (the service recycles streams), so only a failing probe counts as an outage.
    sub.on('debug', (msg: { error?: unknown }) => {
      if (msg.error !== undefined && codeOf(msg.error) === UNAVAILABLE) void this.probe(entry, sub);
    });
    entry.sub = sub;
  }

  private async probe(entry: Entry, sub: Subscription): Promise<void> {
    if (entry.probing || entry.failed || entry.sub !== sub) return;
    entry.probing = true;
    try {
      await sub.getMetadata({ timeout: 5000 });
    } catch (err) {
      this.fail(entry, sub, err);
    } finally {
      entry.probing = false;
    }
  }

  /** The subscription broke: report once, drop its client object, rebuild in the background. */
  private fail(entry: Entry, sub: Subscription, err: unknown): void {
    if (entry.sub !== sub || entry.closed || this.closing !== undefined) return;
    this.noteFailure(err);
    entry.sub = undefined;
    void this.drop(sub);
    if (!entry.failed) {
      entry.failed = true;
      this.log('warn', 'Pub/Sub subscription failed; recreating', { topic: entry.topic, subscription: entry.name, error: messageOf(err) });
      for (const listener of entry.listeners) {
        listener.error(new RelayError('subscription-failure', `lost the Pub/Sub subscription: ${messageOf(err)}`, { topic: entry.topic }));
      }
    }
    void this.recover(entry);
  }

  private recover(entry: Entry): Promise<void> {
    return restore(entry, {
      stopped: () => this.closing !== undefined,
      repair: async () => {
        try {
          await this.pubsub.subscription(entry.name).getMetadata({ timeout: 5000 });
        } catch (err) {
          if (codeOf(err) !== NOT_FOUND) throw err;
          await this.ensure(entry);
        }
      },
      retrying: (err, attempt) => {
        this.noteFailure(err);
        this.log('warn', 'Pub/Sub subscription not restored yet; retrying', { topic: entry.topic, error: messageOf(err), attempt });
      },
      // close() ran meanwhile and may have deleted it before ensure() recreated it.
      discard: () => this.pubsub.subscription(entry.name).delete({ timeout: RPC_TIMEOUT_MS }).catch(() => {}),
      resume: () => {
        this.listen(entry);
        this.recovered(entry);
      },
    });
  }

  private noteFailure(err: unknown): void {
    if (codeOf(err) === UNAVAILABLE || codeOf(err) === DEADLINE_EXCEEDED) this.reachable = false;
  }

  private recovered(entry: Entry): void {
    this.reachable = true;
    if (!entry.failed || entry.closed) return;
    entry.failed = false;
    this.log('info', 'Pub/Sub subscription restored', { topic: entry.topic, subscription: entry.name });
    for (const listener of entry.listeners) listener.recovered();
  }

  /** Stops reading and deletes the subscription. */
  private async dispose(entry: Entry): Promise<void> {
    entry.closed = true;
    const sub = entry.sub;
    entry.sub = undefined;
    if (sub !== undefined) await this.drop(sub);
    await this.pubsub.subscription(entry.name).delete({ timeout: RPC_TIMEOUT_MS }).catch((err: unknown) => {
      if (codeOf(err) !== NOT_FOUND) this.log('warn', 'could not delete Pub/Sub subscription', { subscription: entry.name, error: messageOf(err) });
    });
  }

  private async drop(sub: Subscription): Promise<void> {
    sub.removeAllListeners();
    sub.on('error', () => {}); // a late stream error must not become an unhandled 'error' event
    await sub.close().catch(() => {});
  }

  private check(topic: string): void {
    if (this.closing !== undefined) throw new RelayError('broker-unavailable', 'the broker is closed', { topic });
    const problem = pubsubTopicProblem(topic);
    if (problem !== undefined) throw new RelayError('invalid-topic', `invalid topic ${JSON.stringify(topic)}: ${problem}`, { topic });
  }
}

export const open: BrokerOpener = async (url, options) => {
  const { projectId, createTopics } = parseGcpPubSubUrl(url);
  const { PubSub } = await importPeer<PubSubModule>('@google-cloud/pubsub', 'gcppubsub');
  const broker = new GcpPubSubBroker(new PubSub({ projectId }), createTopics, options.log);
  await broker.start();
  return broker;
};
