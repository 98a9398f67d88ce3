import type { Broker, BrokerSubscription, ControlBus, SubscriptionListener } from '../brokers/broker.ts';
import { RelayError } from '../errors.ts';
import { SHARED_CONTROL_TOPIC } from './node-id.ts';

/**
 * The control bus of a broker that has no plain publish/subscribe of its own (Kafka, the cloud
 * brokers, Redis streams): every node-to-node message travels on one shared topic, tagged with
 * the control topic it is for, and each node keeps those of the topics it listens to. One
 * topic, created once, is all a deployment adds to the broker; what each node subscribes with
 * is the driver's usual per-process subscription (see the broker table for how it expires).
 */
export function sharedControlBus(broker: Broker): ControlBus {
  const listeners = new Map<string, Set<SubscriptionListener>>();
  let shared: Promise<BrokerSubscription> | undefined;
  const everyone = () => [...listeners.values()].flatMap((set) => [...set]);
  const demux: SubscriptionListener = {
    message(body) {
      const bytes = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
      const newline = bytes.indexOf(0x0a);
      if (newline < 0) return;
      for (const listener of listeners.get(bytes.subarray(0, newline).toString('utf8')) ?? []) listener.message(bytes.subarray(newline + 1));
    },
    error: (error) => everyone().forEach((l) => l.error(error)),
    recovered: () => everyone().forEach((l) => l.recovered()),
  };
  return {
    async subscribe(topic, listener) {
      let set = listeners.get(topic);
      if (set === undefined) listeners.set(topic, (set = new Set()));
      set.add(listener);
      try {
        await (shared ??= broker.subscribe(SHARED_CONTROL_TOPIC, demux));
      } catch (err) {
        set.delete(listener);
        shared = undefined;
        throw err instanceof RelayError ? err : new RelayError('subscription-failure', `could not subscribe to ${SHARED_CONTROL_TOPIC}: ${(err as Error).message}`, { cause: err });
      }
      let closed = false;
      return {
        close: async () => {
          if (closed) return;
          closed = true;
          set.delete(listener);
          if (set.size === 0) listeners.delete(topic);
          if (listeners.size > 0 || shared === undefined) return;
          const subscription = shared;
          shared = undefined;
          await (await subscription).close();
        },
      };
    },
    publish: (topic, body) => broker.publish(SHARED_CONTROL_TOPIC, Buffer.concat([Buffer.from(`${topic}\n`), body])),
  };
}
