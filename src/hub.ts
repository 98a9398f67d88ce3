import type { Broker, BrokerSubscription, SubscriptionListener } from './brokers/broker.ts';
import { RelayError, toRelayError } from './errors.ts';
import { RelayMessage } from './frames.ts';
import { TopicHistory, type HistoryLimits } from './history.ts';
import type { Session } from './session.ts';

export interface HubOptions {
  history: HistoryLimits;
  /** How long a topic's broker subscription outlives its last session, in ms. */
  topicGraceMs: number;
  embedJsonPayloads: boolean;
}

export interface HubCounters {
  messagesIn: number;
  brokerErrors: number;
  brokerReconnects: number;
}

/** One topic's broker subscription, its sessions and its recent history. */
class Topic implements SubscriptionListener {
  readonly name: string;
  readonly subscribers = new Set<Session>();
  readonly history: TopicHistory;
  ready: Promise<void> = Promise.resolve();
  subscription: BrokerSubscription | undefined;
  releaseTimer: NodeJS.Timeout | undefined;
  released = false;
  private readonly hub: Hub;

  constructor(name: string, hub: Hub, limits: HistoryLimits) {
    this.name = name;
    this.hub = hub;
    this.history = new TopicHistory(limits);
  }

  message(body: Uint8Array, position?: number): void {
    this.hub.dispatch(this, body, position);
  }

  error(error: RelayError): void {
    this.hub.counters.brokerErrors++;
    const err = error.topic === this.name ? error : new RelayError(error.code, error.message, { topic: this.name });
    for (const session of this.subscribers) session.connection?.sendError(err);
  }

  recovered(): void {
    this.hub.counters.brokerReconnects++;
    const gap = new RelayError('events-lost', `the broker subscription for ${JSON.stringify(this.name)} recovered; messages published while it was down may be lost`, { topic: this.name });
    for (const session of this.subscribers) session.connection?.sendError(gap);
  }
}

/**
 * Topic → sessions. One broker subscription per topic per process, reference-counted by the
 * sessions on it; each message is numbered and encoded once, and the same bytes go to every
 * subscriber.
 */
export class Hub {
  readonly counters: HubCounters = { messagesIn: 0, brokerErrors: 0, brokerReconnects: 0 };
  private readonly broker: Broker;
  private readonly options: HubOptions;
  private readonly topics = new Map<string, Topic>();
  private seq = 0;
  private closed = false;

  constructor(broker: Broker, options: HubOptions) {
    this.broker = broker;
    this.options = options;
  }

  /** The sequence number of the newest message. */
  get lastSeq(): number {
    return this.seq;
  }

  /** The highest broker position seen (brokers that keep history), for the ids of config events. */
  position: number | undefined;

  get topicCount(): number {
    return this.topics.size;
  }

  /** Adds `session` to `topic`, subscribing the broker if it is the first. Resolves to the failure, if any. */
  async subscribe(session: Session, topic: string): Promise<RelayError | undefined> {
    if (this.closed) return new RelayError('subscription-failure', 'the relay is shutting down', { topic });
    let state = this.topics.get(topic);
    if (state === undefined) {
      state = new Topic(topic, this, this.options.history);
      this.topics.set(topic, state);
      state.ready = this.open(state);
    }
    if (state.releaseTimer !== undefined) {
      clearTimeout(state.releaseTimer);
      state.releaseTimer = undefined;
    }
    // Joined before the broker acknowledges, so nothing published right after the ack is missed.
    state.subscribers.add(session);
    try {
      await state.ready;
      return undefined;
    } catch (err) {
      state.subscribers.delete(session);
      if (this.topics.get(topic) === state) this.topics.delete(topic);
      const error = toRelayError(err, 'subscription-failure');
      return error.topic === undefined ? new RelayError(error.code, error.message, { topic }) : error;
    }
  }

  /** Removes `session` from `topic`; the broker subscription goes after a grace period if nobody else is on it. */
  unsubscribe(session: Session, topic: string): void {
    const state = this.topics.get(topic);
    if (state === undefined || !state.subscribers.delete(session) || state.subscribers.size > 0) return;
    if (this.options.topicGraceMs <= 0) {
      void this.release(state);
      return;
    }
    state.releaseTimer = setTimeout(() => void this.release(state), this.options.topicGraceMs);
    state.releaseTimer.unref();
  }

  /** What a topic still holds after `seq`, for replay on resume. */
  historySince(topic: string, seq: number, now: number): { messages: RelayMessage[]; incomplete: boolean } {
    const state = this.topics.get(topic);
    if (state === undefined) return { messages: [], incomplete: false };
    return state.history.since(seq, now);
  }

  dispatch(state: Topic, body: Uint8Array, position?: number): void {
    if (state.released) return;
    const now = Date.now();
    const message = RelayMessage.fromBody(++this.seq, state.name, body, this.options.embedJsonPayloads, now, position);
    if (position !== undefined && (this.position === undefined || position > this.position)) this.position = position;
    this.counters.messagesIn++;
    state.history.append(message);
    for (const session of state.subscribers) session.deliver(message);
  }

  /** Drops history past its age limit (called periodically by the relay). */
  expireHistory(now: number): void {
    for (const state of this.topics.values()) state.history.expire(now);
  }

  async close(): Promise<void> {
    this.closed = true;
    const states = [...this.topics.values()];
    await Promise.all(states.map((s) => this.release(s)));
  }

  private async open(state: Topic): Promise<void> {
    const problem = this.broker.topicProblem(state.name);
    if (problem !== undefined) throw new RelayError('invalid-topic', `invalid topic ${JSON.stringify(state.name)} for ${this.broker.scheme}://: ${problem}`, { topic: state.name });
    const subscription = await this.broker.subscribe(state.name, state);
    if (state.released) await subscription.close();
    else state.subscription = subscription;
  }

  private async release(state: Topic): Promise<void> {
    if (state.released || state.subscribers.size > 0 && !this.closed) return;
    state.released = true;
    if (state.releaseTimer !== undefined) clearTimeout(state.releaseTimer);
    if (this.topics.get(state.name) === state) this.topics.delete(state.name);
    await state.ready.catch(() => {});
    await state.subscription?.close().catch(() => {});
    state.subscription = undefined;
  }
}
