import { registerBrokerLoader } from './broker.ts';

export { openBroker, registerBroker, registerBrokerLoader, registeredSchemes, importPeer } from './broker.ts';
export type { Broker, BrokerOpener, BrokerOptions, BrokerSubscription, SubscriptionListener } from './broker.ts';
export { MemBroker } from './mem.ts';

// Built-in drivers load on first use, so an app pays only for the broker it names.
registerBrokerLoader('mem', async () => (await import('./mem.ts')).open);
registerBrokerLoader('nats', async () => (await import('./nats.ts')).open);
registerBrokerLoader('redis', async () => (await import('./redis.ts')).open);
registerBrokerLoader('rediss', async () => (await import('./redis.ts')).open);
registerBrokerLoader('mqtt', async () => (await import('./mqtt.ts')).open);
registerBrokerLoader('mqtts', async () => (await import('./mqtt.ts')).open);
registerBrokerLoader('amqp', async () => (await import('./amqp.ts')).open);
registerBrokerLoader('amqps', async () => (await import('./amqp.ts')).open);
registerBrokerLoader('rabbit', async () => (await import('./amqp.ts')).open);
registerBrokerLoader('kafka', async () => (await import('./kafka.ts')).open);
registerBrokerLoader('postgres', async () => (await import('./postgres.ts')).open);
registerBrokerLoader('postgresql', async () => (await import('./postgres.ts')).open);
registerBrokerLoader('gcppubsub', async () => (await import('./gcppubsub.ts')).open);
registerBrokerLoader('awssns', async () => (await import('./aws.ts')).openSns);
registerBrokerLoader('awssqs', async () => (await import('./aws.ts')).openSqs);
registerBrokerLoader('azuresb', async () => (await import('./azuresb.ts')).open);
