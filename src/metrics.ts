import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import type { RelayCore } from './relay.ts';

/**
 * Prometheus metrics of one relay. Values are read from the relay's own counters when
 * scraped, so the delivery path only bumps plain numbers.
 */
export function createMetrics(core: RelayCore): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'livepipe_' });

  new Gauge({
    name: 'livepipe_connections',
    help: 'Open client connections, by transport.',
    labelNames: ['transport'],
    registers: [registry],
    collect() {
      // Every transport reports, 0 included, so a dashboard's series never vanishes.
      const open = core.stats().connections;
      for (const transport of new Set(['sse', 'ws', ...Object.keys(open)])) this.set({ transport }, open[transport] ?? 0);
    },
  });
  gauge(registry, 'livepipe_sessions', 'Live sessions, attached or within their TTL.', () => core.stats().sessions);
  gauge(registry, 'livepipe_topics', 'Topics with a broker subscription in this process.', () => core.stats().topics);
  gauge(registry, 'livepipe_broker_connected', '1 while the broker connection is usable.', () => (core.broker.isConnected() ? 1 : 0));
  counter(registry, 'livepipe_messages_in_total', 'Messages received from the broker.', () => core.stats().messagesIn);
  counter(registry, 'livepipe_messages_out_total', 'Messages written to client connections (one per delivery).', () => core.stats().messagesDelivered);
  counter(registry, 'livepipe_messages_dropped_total', 'Messages dropped for clients that read too slowly.', () => core.stats().messagesDropped);
  counter(registry, 'livepipe_broker_errors_total', 'Broker subscription failures reported by the driver.', () => core.stats().brokerErrors);
  return registry;
}

function gauge(registry: Registry, name: string, help: string, read: () => number): void {
  new Gauge({ name, help, registers: [registry], collect() { this.set(read()); } });
}

function counter(registry: Registry, name: string, help: string, read: () => number): void {
  let reported = 0;
  new Counter({
    name,
    help,
    registers: [registry],
    collect() {
      const value = read();
      if (value > reported) this.inc(value - reported);
      reported = value;
    },
  });
}
