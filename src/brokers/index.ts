import { registerBrokerLoader } from './broker.ts';

export { openBroker, registerBroker, registerBrokerLoader, registeredSchemes, importPeer } from './broker.ts';
export type { Broker, BrokerOpener, BrokerOptions, BrokerSubscription, SubscriptionListener } from './broker.ts';
export { MemBroker } from './mem.ts';

// Built-in drivers load on first use, so an app pays only for the broker it names.
registerBrokerLoader('mem', async () => (await import('./mem.ts')).open);
