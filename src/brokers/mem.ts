import { RelayError } from '../errors.ts';
import type { Broker, BrokerOpener, ControlBus, BrokerSubscription, SubscriptionListener } from './broker.ts';

/**
 * The in-memory broker: `mem://` (or `mem://name` for a separate bus). Every MemBroker opened
 * on the same bus name in one process shares its topics, so two relays on one bus behave like
 * two relay processes on a real broker (broadcast, never competing consumers).
 */
class Bus {
  readonly topics = new Map<string, Set<SubscriptionListener>>();
}

const buses = new Map<string, Bus>();

export class MemBroker implements Broker {
  readonly scheme = 'mem';
  /** Node-to-node messages travel as any topic's: this driver creates and retains nothing for them. */
  get control(): ControlBus {
    return this;
  }
  private readonly bus: Bus;
  private readonly own = new Set<{ topic: string; listener: SubscriptionListener }>();
  private closed = false;
  private outage = false;

  constructor(busName = '') {
    let bus = buses.get(busName);
    if (bus === undefined) buses.set(busName, (bus = new Bus()));
    this.bus = bus;
  }

  topicProblem(): string | undefined {
    return undefined;
  }

  async subscribe(topic: string, listener: SubscriptionListener): Promise<BrokerSubscription> {
    this.assertOpen();
    if (this.outage) throw new RelayError('subscription-failure', 'the in-memory broker is in a simulated outage', { topic });
    let listeners = this.bus.topics.get(topic);
    if (listeners === undefined) this.bus.topics.set(topic, (listeners = new Set()));
    listeners.add(listener);
    const entry = { topic, listener };
    this.own.add(entry);
    return {
      close: async () => {
        this.own.delete(entry);
        const set = this.bus.topics.get(topic);
        if (set === undefined) return;
        set.delete(listener);
        if (set.size === 0) this.bus.topics.delete(topic);
      },
    };
  }

  async publish(topic: string, body: Uint8Array): Promise<void> {
    this.assertOpen();
    if (this.outage) throw new RelayError('broker-unavailable', 'the in-memory broker is in a simulated outage', { topic });
    const listeners = this.bus.topics.get(topic);
    if (listeners === undefined) return;
    // Copy so that a receiver keeping the bytes is never affected by the publisher reusing its buffer.
    const copy = Uint8Array.prototype.slice.call(body);
    for (const listener of listeners) listener.message(copy);
  }

  isConnected(): boolean {
    return !this.closed && !this.outage;
  }

  /**
   * Simulates losing the broker (as a server restart would): every subscription of this
   * instance gets `error`, publishing fails, until endOutage(), which sends `recovered`.
   * Messages published on the bus meanwhile are not delivered to this instance.
   */
  beginOutage(): void {
    if (this.outage) return;
    this.outage = true;
    for (const { topic, listener } of this.own) {
      this.bus.topics.get(topic)?.delete(listener);
      listener.error(new RelayError('subscription-failure', 'lost the connection to the in-memory broker', { topic }));
    }
  }

  endOutage(): void {
    if (!this.outage) return;
    this.outage = false;
    for (const { topic, listener } of this.own) {
      let listeners = this.bus.topics.get(topic);
      if (listeners === undefined) this.bus.topics.set(topic, (listeners = new Set()));
      listeners.add(listener);
      listener.recovered();
    }
  }

  /** Topics that have at least one subscriber on this bus (used to prove nothing is left behind). */
  activeTopics(): string[] {
    return [...this.bus.topics.keys()];
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const { topic, listener } of this.own) {
      const set = this.bus.topics.get(topic);
      set?.delete(listener);
      if (set?.size === 0) this.bus.topics.delete(topic);
    }
    this.own.clear();
  }

  private assertOpen(): void {
    if (this.closed) throw new RelayError('broker-unavailable', 'the broker is closed');
  }
}

export const open: BrokerOpener = async (url) => new MemBroker(decodeURIComponent(url.hostname + url.pathname.replace(/^\/$/, '')));
