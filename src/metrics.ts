import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { REJECT_REASONS } from './limits.ts';
import type { RelayCore } from './relay.ts';

/**
 * Prometheus metrics of one relay. Values are read from the relay's own counters when
 * scraped, so the delivery path only bumps plain numbers.
 */
export function createMetrics(core: RelayCore): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'livepipe_' });

  const seen = new Set(['sse', 'ws']);
  new Gauge({
    name: 'livepipe_connections',
    help: 'Open client connections, by transport.',
    labelNames: ['transport'],
    registers: [registry],
    collect() {
      // Every transport seen reports, 0 included, so a series neither vanishes nor keeps the count
      // of connections that have closed since.
      const open = core.stats().connections;
      for (const transport of Object.keys(open)) seen.add(transport);
      for (const transport of seen) this.set({ transport }, open[transport] ?? 0);
    },
  });
  gauge(registry, 'livepipe_sessions', 'Live sessions, attached or within their TTL.', () => core.stats().sessions);
  gauge(registry, 'livepipe_topics', 'Topics with a broker subscription in this process.', () => core.stats().topics);
  gauge(registry, 'livepipe_broker_connected', '1 while the broker connection is usable.', () => (core.broker.isConnected() ? 1 : 0));
  counter(registry, 'livepipe_messages_in_total', 'Messages received from the broker.', () => core.stats().messagesIn);
  counter(registry, 'livepipe_messages_out_total', 'Messages written to client connections (one per delivery).', () => core.stats().messagesDelivered);
  counter(registry, 'livepipe_messages_dropped_total', 'Messages dropped for clients that read too slowly.', () => core.stats().messagesDropped);
  counter(registry, 'livepipe_broker_errors_total', 'Broker subscription failures reported by the driver.', () => core.stats().brokerErrors);
  counter(registry, 'livepipe_broker_reconnects_total', 'Broker subscriptions that recovered after an outage (one per topic per recovery).', () => core.stats().brokerReconnects);
  const updates = new Histogram({
    name: 'livepipe_update_duration_seconds',
    help: 'Time to apply an update_subscriptions request, broker subscribe included, by outcome (ok or error).',
    labelNames: ['outcome'],
    // Local requests take well under a millisecond; a broker round trip, milliseconds to seconds.
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [registry],
  });
  core.updateTimed = (seconds, ok) => updates.observe({ outcome: ok ? 'ok' : 'error' }, seconds);
  const reported: Record<string, number> = {};
  new Counter({
    name: 'livepipe_rejected_total',
    help: 'Requests refused by a cap or rate limit, by reason.',
    labelNames: ['reason'],
    registers: [registry],
    collect() {
      // Every reason reports, 0 included, so a dashboard's series never vanishes.
      for (const reason of REJECT_REASONS) {
        const value = core.limits.rejected[reason];
        this.inc({ reason }, value - (reported[reason] ?? 0));
        reported[reason] = value;
      }
    },
  });
  const peers = core.peers;
  if (peers !== undefined) {
    gauge(registry, 'livepipe_scaleout_nodes', 'Other nodes heard from within three heartbeats.', () => peers.stats().nodes);
    gauge(registry, 'livepipe_scaleout_session_records', "Records of other nodes' sessions held here.", () => peers.stats().records);
    counter(registry, 'livepipe_scaleout_sessions_handed_over_total', 'Sessions a live node handed to this one (a client resumed here).', () => peers.stats().handedOver);
    counter(registry, 'livepipe_scaleout_sessions_restored_total', 'Sessions of a gone node restored here from their records.', () => peers.stats().restored);
    counter(registry, 'livepipe_scaleout_sessions_given_total', 'Sessions this node handed to another.', () => peers.stats().given);
    counter(registry, 'livepipe_scaleout_updates_forwarded_total', 'update_subscriptions sent to the node that holds the session.', () => peers.stats().updatesForwarded);
    counter(registry, 'livepipe_scaleout_requests_unanswered_total', 'Requests to other nodes that got no answer in time.', () => peers.stats().unanswered);
  }
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
