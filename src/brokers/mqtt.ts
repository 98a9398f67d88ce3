import { randomBytes } from 'node:crypto';
import { RelayError } from '../errors.ts';
import { importPeer } from './broker.ts';
import type { Broker, BrokerOpener, ControlBus, BrokerOptions, BrokerSubscription, SubscriptionListener } from './broker.ts';
import { TopicEntries } from './topic-entries.ts';
import type { TopicEntry } from './topic-entries.ts';
import type * as Mqtt from 'mqtt';

/**
 * MQTT: `mqtt://[user:pass@]host[:port]`, `mqtts://` for TLS; `?protocol=5` (the default) or
 * `?protocol=3.1.1`. Topics map 1:1 to topic names; wildcards and `$` topics are rejected.
 *
 * One connection per driver instance, with its own random client id, a clean session
 * (MQTT 5: clean start and session expiry 0), so the broker keeps no session, subscription or
 * queued message once it closes; the driver re-subscribes by itself after a reconnect.
 *
 * QoS 1 both ways: publish() resolves on the broker's PUBACK, and subscriptions take QoS 1 so
 * that QoS 1 publishers keep their acknowledged, in-order delivery to the relay (a QoS 0
 * subscription would downgrade them to fire-and-forget; QoS 2's extra round trip buys nothing
 * without a persistent session). Within one connection that is at-least-once, in order; with a
 * clean session, messages published while the relay is disconnected are lost.
 *
 * Retained messages are not delivered: the broker sends them because of a new subscription,
 * so they predate it (PROTOCOL.md: a subscription delivers what is published after it).
 */

const OPTIONS = ['protocol'];
const VERSIONS: Record<string, 4 | 5> = { '5': 5, '3.1.1': 4 };

/** Why `topic` is not an MQTT topic name this driver may use, or undefined. */
export function mqttTopicProblem(topic: string): string | undefined {
  if (/[+#]/.test(topic)) return 'an MQTT topic must not contain + or # (wildcards would widen the subscription)';
  if (topic.startsWith('$')) return 'MQTT topics starting with $ are reserved for the broker (e.g. $SYS)';
  // MQTT lets brokers refuse these, and mosquitto drops the whole connection for them.
  if (/[\u0080-\u009f]|\p{Noncharacter_Code_Point}/u.test(topic)) return 'an MQTT topic must not contain control characters U+0080 to U+009F or Unicode noncharacters';
  return undefined;
}

export class MqttBroker implements Broker {
  readonly scheme: string;
  /** Node-to-node messages travel as any topic's: this driver creates and retains nothing for them. */
  get control(): ControlBus {
    return this;
  }
  /** The MQTT client id of this instance (unique, random). */
  readonly clientId: string;
  private readonly client: Mqtt.MqttClient;
  private readonly log: BrokerOptions['log'];
  /** A topic's `ready` settles once the broker has answered the SUBSCRIBE. */
  private readonly topics = new TopicEntries<TopicEntry>();
  private outage = false;
  private lastError = '';
  private closed = false;

  constructor(scheme: string, clientId: string, client: Mqtt.MqttClient, log: BrokerOptions['log']) {
    this.scheme = scheme;
    this.clientId = clientId;
    this.client = client;
    this.log = log;
    client.on('message', (topic, payload, packet) => {
      if (packet.retain) return;
      for (const l of this.topics.get(topic)?.listeners ?? []) l.message(payload);
    });
    client.on('error', (err) => (this.lastError = err.message));
    client.on('close', () => this.beginOutage());
    client.on('connect', () => void this.endOutage());
  }

  topicProblem(topic: string): string | undefined {
    return mqttTopicProblem(topic);
  }

  async subscribe(topic: string, listener: SubscriptionListener): Promise<BrokerSubscription> {
    this.assertUsable(topic, 'subscription-failure');
    const subscription = await this.topics.joinWhenReady(topic, listener, {
      create: () => ({ listeners: new Set(), ready: Promise.resolve() }),
      start: () => this.client.subscribeAsync(topic, { qos: 1 }).then(
        () => {},
        (err: unknown) => {
          throw new RelayError('subscription-failure', `the MQTT broker refused the subscription to ${topic}: ${(err as Error).message}`, { topic, cause: err });
        },
      ),
      release: async () => {
        // While disconnected the broker holds nothing (clean session), and the topic is no longer re-subscribed.
        if (this.client.connected) await this.client.unsubscribeAsync(topic).catch(() => {});
      },
    });
    // The topic's last other subscriber may have left meanwhile: start over.
    return subscription ?? this.subscribe(topic, listener);
  }

  async publish(topic: string, body: Uint8Array): Promise<void> {
    this.assertUsable(topic, 'broker-unavailable');
    try {
      await this.client.publishAsync(topic, Buffer.from(body.buffer, body.byteOffset, body.byteLength), { qos: 1 });
    } catch (err) {
      throw new RelayError('broker-unavailable', `the MQTT broker did not accept the message on ${topic}: ${(err as Error).message}`, { topic, cause: err });
    }
  }

  isConnected(): boolean {
    return !this.closed && this.client.connected;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.topics.clear();
    // DISCONNECT ends the clean session: the broker drops its subscriptions.
    await this.client.endAsync();
  }

  private assertUsable(topic: string, unavailable: 'subscription-failure' | 'broker-unavailable'): void {
    if (this.closed) throw new RelayError('broker-unavailable', 'the broker is closed', { topic });
    const problem = this.topicProblem(topic);
    if (problem !== undefined) throw new RelayError('invalid-topic', `invalid topic ${JSON.stringify(topic)}: ${problem}`, { topic });
    if (!this.isConnected()) throw new RelayError(unavailable, `the connection to the MQTT broker is down${this.lastError ? ` (${this.lastError})` : ''}; retrying`, { topic });
  }

  private beginOutage(): void {
    if (this.closed || this.outage) return;
    this.outage = true;
    const message = `lost the connection to the MQTT broker${this.lastError ? ` (${this.lastError})` : ''}; reconnecting`;
    this.log?.('warn', message);
    this.topics.failAll((topic) => new RelayError('subscription-failure', message, { topic }));
  }

  /** After a reconnect the clean session holds nothing: subscribe every topic again, then report. */
  private async endOutage(): Promise<void> {
    if (!this.outage) return;
    const topics = new Set(this.topics.keys());
    try {
      if (topics.size > 0) await this.client.subscribeAsync(Object.fromEntries([...topics].map((t) => [t, { qos: 1 as const }])));
    } catch (err) {
      // Left in the outage: the next reconnect tries again.
      this.log?.('error', `re-subscribing after a reconnect failed: ${(err as Error).message}`);
      return;
    }
    if (!this.client.connected) return;
    this.outage = false;
    this.log?.('info', 'reconnected to the MQTT broker');
    // Topics subscribed since the reconnect never failed.
    this.topics.recoverAll((topic) => topics.has(topic));
  }
}

export const open: BrokerOpener = async (url, options) => {
  const scheme = url.protocol.replace(/:$/, '');
  for (const key of url.searchParams.keys()) {
    if (!OPTIONS.includes(key)) throw new RelayError('bad-request', `unknown ${scheme}:// option ${key} (known: ${OPTIONS.join(', ')})`);
  }
  const protocol = url.searchParams.get('protocol') ?? '5';
  const protocolVersion = VERSIONS[protocol];
  if (protocolVersion === undefined) throw new RelayError('bad-request', `${scheme}:// option protocol=${JSON.stringify(protocol)}: use 5 or 3.1.1`);
  const mqtt = await importPeer<typeof Mqtt>('mqtt', scheme);
  const server = new URL(url);
  server.search = '';
  // 1 to 23 letters and digits is what every MQTT 3.1.1 broker must accept.
  const clientId = `livepipe${randomBytes(7).toString('hex')}`;
  let client: Mqtt.MqttClient;
  try {
    // allowRetries false: the first failed attempt rejects instead of retrying for ever.
    client = await mqtt.connectAsync(server.href, { clientId, clean: true, protocolVersion, resubscribe: false, reconnectPeriod: 1000, connectTimeout: 10_000 }, false);
  } catch (err) {
    throw new RelayError('broker-unavailable', `could not connect to the MQTT broker at ${server.host}: ${(err as Error).message}`, { cause: err });
  }
  return new MqttBroker(scheme, clientId, client, options.log);
};
