import { randomBytes } from 'node:crypto';
import type { Admin, ClusterTopicMetadata, Consumer, Producer } from '@platformatic/kafka';
import { RelayError } from '../errors.ts';
import { backoff, importPeer } from './broker.ts';
import type { Broker, BrokerOpener, BrokerOptions, BrokerSubscription, SubscriptionListener } from './broker.ts';

/**
 * Apache Kafka: `kafka://host:9092`, more bootstrap servers with `?brokers=host2:9092,host3:9092`.
 * Option `create_topics=false` stops the driver from creating missing topics.
 *
 * Broadcast without a consumer group: each driver instance reads every partition of each subscribed
 * topic itself (like Kafka's assign(), never subscribe()), so no two relay processes compete and
 * nothing is left on the broker by a process that dies. `subscribe` lists the topic's latest offsets
 * and resolves once they are recorded: every message produced after it is fetched from there. One
 * fetch loop long-polls the leaders of all subscribed partitions at once (one request per leader, as
 * Kafka intends), so no topic waits for another; a newly subscribed topic joins the next poll, at
 * most 500 ms later, and misses nothing meanwhile since its position is already recorded.
 *
 * Missing topics are created on subscribe through the admin API with the broker's default partition
 * count and replication (not via auto.create.topics.enable, which is often off), so that subscribing
 * before the first publish works (publishing creates a missing topic too). Order: Kafka orders per
 * partition; this driver publishes without a key, which the client's default partitioner puts on
 * partition 0, so the relay's own publishes keep topic order.
 *
 * Resume by offset: the position of every partition is held here (`positions`), and after an outage
 * fetching continues from it, so messages that stayed in the log meanwhile are not lost. A resumable
 * relay would need an event id that carries (partition, offset) per topic and a subscribe that starts
 * from given offsets instead of the latest ones, bounded by the topic's retention.
 */

type KafkaModule = typeof import('@platformatic/kafka');
type FetchResponse = Awaited<ReturnType<Consumer['fetch']>>;
type FetchRequestTopic = Parameters<Consumer['fetch']>[0]['topics'][number];

const TOPIC_NAME = /^[a-zA-Z0-9._-]{1,249}$/;
const LONG_POLL_MS = 500;
const PARTITION_MAX_BYTES = 1024 * 1024; // a soft limit: Kafka always returns at least one whole batch
const OFFSET_OUT_OF_RANGE = 1;
const UNKNOWN_TOPIC = [3, 100]; // UNKNOWN_TOPIC_OR_PARTITION, UNKNOWN_TOPIC_ID

interface TopicState {
  readonly listeners: Set<SubscriptionListener>;
  /** The next offset to fetch, by partition; a partition not listed starts at 0 (it appeared after subscribe). */
  positions: bigint[];
  /** Reported to the listeners as failed (outage or deleted topic) and not yet recovered. */
  failed: boolean;
}

export function kafkaTopicProblem(topic: string): string | undefined {
  if (!TOPIC_NAME.test(topic)) return 'Kafka topic names are 1 to 249 of the characters a-z A-Z 0-9 . _ -';
  if (topic === '.' || topic === '..') return 'Kafka does not allow the topic names . and ..';
  return undefined;
}

export interface KafkaUrl {
  bootstrapBrokers: string[];
  createTopics: boolean;
}

export function parseKafkaUrl(url: URL): KafkaUrl {
  if (url.host === '') throw new RelayError('bad-request', 'a kafka:// URL names a bootstrap server, e.g. kafka://127.0.0.1:9092');
  const bootstrapBrokers = [`${url.hostname}:${url.port || '9092'}`];
  let createTopics = true;
  for (const [key, value] of url.searchParams) {
    if (key === 'brokers') {
      for (const broker of value.split(',')) {
        if (!/^[^\s:,]+:\d{1,5}$/.test(broker)) throw new RelayError('bad-request', `kafka:// option brokers: ${JSON.stringify(broker)} is not host:port`);
        bootstrapBrokers.push(broker);
      }
    } else if (key === 'create_topics') {
      if (value !== 'true' && value !== 'false') throw new RelayError('bad-request', `kafka:// option create_topics=${JSON.stringify(value)} must be true or false`);
      createTopics = value === 'true';
    } else {
      throw new RelayError('bad-request', `unknown kafka:// option ${JSON.stringify(key)} (known: brokers, create_topics)`);
    }
  }
  return { bootstrapBrokers, createTopics };
}

// The library reports a missing topic as a plain UserError (the protocol error code is not kept).
const isUnknownTopic = (err: unknown) => err instanceof Error && err.message.startsWith('Unknown topic ');

export class KafkaBroker implements Broker {
  readonly scheme = 'kafka';
  /** The client id of every connection of this instance; for diagnostics and tests. */
  readonly clientId = `livepipe-${randomBytes(6).toString('hex')}`;
  private readonly topics = new Map<string, TopicState>();
  private readonly kafka: KafkaModule;
  private readonly consumer: Consumer;
  private readonly producer: Producer;
  private readonly admin: Admin;
  private readonly createTopics: boolean;
  private readonly log: NonNullable<BrokerOptions['log']>;
  private outage = false;
  private wake: (() => void) | undefined;
  private loop: Promise<void> | undefined;
  private closing: Promise<void> | undefined;

  constructor(kafka: KafkaModule, { bootstrapBrokers, createTopics }: KafkaUrl, log: BrokerOptions['log'] = () => {}) {
    this.kafka = kafka;
    this.createTopics = createTopics;
    this.log = log;
    const base = { clientId: this.clientId, bootstrapBrokers };
    // The consumer never joins a group (the group id is only required by its type): it serves the
    // fetch loop alone, because Kafka answers the requests of one connection in order, and anything
    // else on it would wait behind a long poll. Subscribing asks the admin client instead.
    this.consumer = new kafka.Consumer({ ...base, groupId: this.clientId, maxWaitTime: LONG_POLL_MS });
    this.producer = new kafka.Producer(base);
    this.admin = new kafka.Admin(base);
    // The library retries a fetch across a reconnect (a quick broker restart goes unseen), so a
    // dropped connection is the signal of an outage. Only real failures close these connections:
    // the fetch loop keeps them busy, so the broker never closes them as idle.
    this.consumer.on('client:broker:disconnect', () => {
      if (this.closing === undefined && this.topics.size > 0) this.lose('the connection to Kafka dropped; reconnecting');
    });
  }

  /** Checks that the cluster answers; rejects (and closes) when it does not. */
  async start(): Promise<void> {
    try {
      await this.admin.metadata({ topics: [] });
    } catch (err) {
      await this.close();
      throw new RelayError('broker-unavailable', `cannot connect to Kafka: ${innermostMessage(err)}`, { cause: err });
    }
    this.loop = this.run();
  }

  topicProblem(topic: string): string | undefined {
    return kafkaTopicProblem(topic);
  }

  async subscribe(topic: string, listener: SubscriptionListener): Promise<BrokerSubscription> {
    this.check(topic);
    if (!this.topics.has(topic)) {
      const positions: bigint[] = [];
      try {
        const { partitions } = await this.topicMetadata(topic);
        const latest = this.kafka.ListOffsetTimestamps.LATEST;
        const [listed] = await this.admin.listOffsets({ topics: [{ name: topic, partitions: partitions.map((_, partitionIndex) => ({ partitionIndex, timestamp: latest })) }] });
        for (const { partitionIndex, offset } of listed?.partitions ?? []) positions[partitionIndex] = offset;
      } catch (err) {
        throw err instanceof RelayError ? err : new RelayError('subscription-failure', `cannot subscribe to Kafka topic ${topic}: ${innermostMessage(err)}`, { topic, cause: err });
      }
      if (this.closing !== undefined) throw new RelayError('broker-unavailable', 'the broker is closed', { topic });
      // A concurrent subscribe to the same topic may have won meanwhile; its positions are as good.
      if (!this.topics.has(topic)) {
        this.topics.set(topic, { listeners: new Set(), positions, failed: false });
        this.wake?.();
      }
    }
    this.topics.get(topic)?.listeners.add(listener);
    let open = true;
    return {
      close: async () => {
        if (!open) return;
        open = false;
        const state = this.topics.get(topic);
        if (state === undefined || !state.listeners.delete(listener) || state.listeners.size > 0) return;
        this.topics.delete(topic);
      },
    };
  }

  async publish(topic: string, body: Uint8Array): Promise<void> {
    this.check(topic);
    try {
      // Mostly answered from the admin client's metadata cache; creates the topic if it is missing.
      if (this.createTopics) await this.topicMetadata(topic);
      await this.producer.send({ messages: [{ topic, value: Buffer.from(body.buffer, body.byteOffset, body.byteLength) }] });
    } catch (err) {
      throw err instanceof RelayError ? err : new RelayError('broker-unavailable', `Kafka did not accept the message: ${innermostMessage(err)}`, { topic, cause: err });
    }
  }

  isConnected(): boolean {
    return this.closing === undefined && this.loop !== undefined && !this.outage;
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      this.topics.clear();
      this.wake?.();
      // Closing the clients aborts a fetch in flight, so the loop ends promptly.
      await Promise.allSettled([this.consumer.close(true), this.producer.close(true), this.admin.close()]);
      await this.loop;
    })();
    return this.closing;
  }

  /** The topic's partitions, after creating it with the broker's defaults if it is missing (and that is allowed). */
  private async topicMetadata(topic: string): Promise<ClusterTopicMetadata> {
    try {
      // No retries: the library would retry an unknown topic for seconds.
      const meta = (await this.admin.metadata({ topics: [topic], retries: 0 })).topics.get(topic);
      if (meta !== undefined) return meta;
    } catch (err) {
      if (!isUnknownTopic(err)) throw err;
    }
    if (!this.createTopics) throw new RelayError('subscription-failure', `Kafka topic ${topic} does not exist (and create_topics=false)`, { topic });
    await this.admin.createTopics({ topics: [topic] }).catch((err: unknown) => {
      if (!this.kafka.findErrorBy(err as Error, 'apiId', 'TOPIC_ALREADY_EXISTS')) throw err;
    });
    const meta = (await this.admin.metadata({ topics: [topic] })).topics.get(topic);
    if (meta === undefined) throw new Error(`Kafka topic ${topic} was created but is not in the metadata`);
    return meta;
  }

  /** The fetch loop: one long poll per partition leader at a time, until closed. */
  private async run(): Promise<void> {
    for (let failures = 0; this.closing === undefined; ) {
      if (this.topics.size === 0) {
        this.outage = false; // nothing subscribed, nothing broken
        await new Promise<void>((resolve) => (this.wake = resolve));
        this.wake = undefined;
        continue;
      }
      try {
        await this.fetchOnce();
        failures = 0;
      } catch (err) {
        if (this.closing !== undefined) break;
        this.lose(`Kafka fetch failed (${innermostMessage(err)}); retrying`);
        await backoff(++failures);
      }
    }
  }

  /** One round: a fetch from each leader of the subscribed partitions, at their recorded positions. */
  private async fetchOnce(): Promise<void> {
    const requests = new Map<number, FetchRequestTopic[]>();
    const names = new Map<string, string>();
    // Mostly answered from the library's cache. No retries inside: this loop retries, with backoff.
    await Promise.all([...this.topics].map(async ([topic, state]) => {
      let meta: ClusterTopicMetadata | undefined;
      try {
        meta = (await this.consumer.metadata({ topics: [topic], retries: 0 })).topics.get(topic);
      } catch (err) {
        if (!isUnknownTopic(err)) throw err;
      }
      if (meta === undefined) {
        // Deleted under us: only this topic fails. If it comes back, everything in it is new.
        this.fail(topic, state, `the Kafka topic ${topic} no longer exists`);
        state.positions = [];
        return;
      }
      names.set(meta.id, topic);
      meta.partitions.forEach(({ leader }, partition) => {
        let list = requests.get(leader);
        if (list === undefined) requests.set(leader, (list = []));
        const fetchOffset = state.positions[partition] ?? 0n;
        list.push({ topicId: meta.id, partitions: [{ partition, fetchOffset, currentLeaderEpoch: -1, lastFetchedEpoch: -1, partitionMaxBytes: PARTITION_MAX_BYTES }] });
      });
    }));
    if (requests.size === 0) {
      await new Promise((resolve) => setTimeout(resolve, LONG_POLL_MS)); // only deleted topics: probe again later
      return;
    }
    await Promise.all([...requests].map(async ([node, topics]) => {
      let response: FetchResponse;
      try {
        response = await this.consumer.fetch({ node, topics });
      } catch (err) {
        await this.partitionErrors(err, names);
        return;
      }
      // Delivery works (again) for these topics: say so before handing over what it brought.
      if (this.outage) this.log('info', 'Kafka fetching recovered');
      this.outage = false;
      for (const { topicId } of topics) {
        const state = this.topics.get(names.get(topicId) ?? '');
        if (state !== undefined) this.recovered(state);
      }
      this.deliver(response, names);
    }));
  }

  /** Hands every record at or after the recorded position to the listeners, in partition order. */
  private deliver(response: FetchResponse, names: Map<string, string>): void {
    for (const { topicId, partitions } of response.responses) {
      const state = this.topics.get(names.get(topicId) ?? '');
      if (state === undefined) continue; // unsubscribed while the fetch was in flight
      for (const { partitionIndex, records } of partitions) {
        for (const batch of records ?? []) {
          // Transaction markers (control batches) carry no message but do take offsets.
          for (const record of batch.attributes & this.kafka.IS_CONTROL ? [] : batch.records) {
            const offset = batch.firstOffset + BigInt(record.offsetDelta);
            if (offset < (state.positions[partitionIndex] ?? 0n)) continue; // a batch can start before the position
            state.positions[partitionIndex] = offset + 1n;
            const body = record.value ?? Buffer.alloc(0);
            for (const listener of state.listeners) listener.message(body);
          }
          const next = batch.firstOffset + BigInt(batch.lastOffsetDelta) + 1n;
          if (next > (state.positions[partitionIndex] ?? 0n)) state.positions[partitionIndex] = next;
        }
      }
    }
  }

  /**
   * Per-partition errors of a fetch. A deleted topic: refresh metadata, so that the next round fails
   * that topic alone. A position beyond the log (topic recreated, or data expired while away):
   * restart at the latest offset. Anything else propagates.
   */
  private async partitionErrors(err: unknown, names: Map<string, string>): Promise<void> {
    const response = responseOf(err);
    if (response === undefined || response.errorCode !== 0) throw err;
    const stale: Array<[string, number]> = [];
    for (const { topicId, partitions } of response.responses) {
      for (const { partitionIndex, errorCode } of partitions) {
        if (errorCode === OFFSET_OUT_OF_RANGE) stale.push([names.get(topicId) ?? '', partitionIndex]);
        else if (UNKNOWN_TOPIC.includes(errorCode)) this.consumer.clearMetadata();
        else if (errorCode !== 0) throw err;
      }
    }
    for (const [topic, partition] of stale) {
      const state = this.topics.get(topic);
      if (state === undefined) continue;
      const latest = (await this.consumer.listOffsets({ topics: [topic], partitions: { [topic]: [partition] }, timestamp: this.kafka.ListOffsetTimestamps.LATEST })).get(topic);
      this.log('warn', 'Kafka offset out of range; skipping to the latest offset', { topic, partition, from: String(state.positions[partition]) });
      state.positions[partition] = latest?.[partition] ?? 0n;
    }
  }

  /** Connection-wide trouble: every subscribed topic fails, once per outage. */
  private lose(message: string): void {
    if (!this.outage) this.log('warn', message);
    this.outage = true;
    for (const [topic, state] of this.topics) this.fail(topic, state, message);
  }

  private fail(topic: string, state: TopicState, message: string): void {
    if (state.failed) return;
    state.failed = true;
    for (const listener of state.listeners) listener.error(new RelayError('subscription-failure', message, { topic }));
  }

  private recovered(state: TopicState): void {
    if (!state.failed) return;
    state.failed = false;
    for (const listener of state.listeners) listener.recovered();
  }

  private check(topic: string): void {
    if (this.closing !== undefined) throw new RelayError('broker-unavailable', 'the broker is closed', { topic });
    const problem = kafkaTopicProblem(topic);
    if (problem !== undefined) throw new RelayError('invalid-topic', `invalid topic ${JSON.stringify(topic)}: ${problem}`, { topic });
  }
}

/** The response a failed fetch carried: on its error, or on the last attempt's when the library retried. */
function responseOf(err: unknown): FetchResponse | undefined {
  const { response, errors } = err as { response?: FetchResponse; errors?: unknown[] };
  if (response !== undefined) return response;
  return Array.isArray(errors) && errors.length > 0 ? responseOf(errors[errors.length - 1]) : undefined;
}

/** The library nests causes in AggregateErrors; the innermost messages say what happened. */
function innermostMessage(err: unknown): string {
  const errors = (err as { errors?: unknown[] }).errors;
  if (Array.isArray(errors) && errors.length > 0) return innermostMessage(errors[errors.length - 1]);
  return err instanceof Error ? err.message : String(err);
}

export const open: BrokerOpener = async (url, options) => {
  const config = parseKafkaUrl(url);
  const kafka = await importPeer<KafkaModule>('@platformatic/kafka', 'kafka');
  const broker = new KafkaBroker(kafka, config, options.log);
  await broker.start();
  return broker;
};
