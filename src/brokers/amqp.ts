import { randomBytes } from 'node:crypto';
import type { AsyncMessage, Channel, Connection, Publisher } from 'rabbitmq-client';
import { RelayError } from '../errors.ts';
import { importPeer } from './broker.ts';
import type { Broker, BrokerOpener, BrokerOptions, BrokerSubscription, SubscriptionListener } from './broker.ts';

/**
 * RabbitMQ (AMQP 0-9-1): `amqp://user:pass@host:5672/vhost`, `amqps://…`, or `rabbit://…` (the Go
 * CDK's name for the same thing).
 *
 * Broadcast: each driver instance (relay process) owns ONE exclusive, auto-delete, server-named
 * queue, bound to a durable topic exchange (`?exchange=`, default `livepipe`) once per subscribed
 * topic with the topic as routing key. Publishing sends to the exchange with the topic as routing key,
 * with publisher confirms. The queue and its bindings die with the connection; after a reconnect the
 * driver declares a new queue and binds every live topic again (rabbitmq-client reconnects the
 * connection but only re-runs setup for its own Consumer class, whose bindings are fixed at creation).
 *
 * Bodies: rabbitmq-client decodes a body by its content-type before handing it over: `text/plain`
 * arrives as a string (re-encoded here as UTF-8, so exact for valid UTF-8) and `application/json` as
 * parsed JSON (re-serialized here, so equal as JSON but not necessarily byte for byte). Any other or
 * no content-type, which is what this driver publishes, arrives byte-exact.
 */

type RabbitModule = typeof import('rabbitmq-client');

const MAX_ROUTING_KEY_BYTES = 255; // an AMQP shortstr
const EXCHANGE_NAME = /^[A-Za-z0-9_.:-]{1,255}$/;
// Query parameters that rabbitmq-client itself reads from the URL (all non-negative integers).
const CLIENT_PARAMS = ['heartbeat', 'connection_timeout', 'channel_max'];
const RETRY_MAX_MS = 10_000;

export function amqpTopicProblem(topic: string): string | undefined {
  const bytes = Buffer.byteLength(topic, 'utf8');
  if (bytes > MAX_ROUTING_KEY_BYTES) return `AMQP routing keys are at most ${MAX_ROUTING_KEY_BYTES} bytes (this one is ${bytes})`;
  if (topic.split('.').some((word) => word === '*' || word === '#')) {
    return 'the dot-separated words * and # are wildcards in AMQP topic bindings and cannot be part of a topic';
  }
  return undefined;
}

/** Splits the broker URL into the exchange name and the URL that rabbitmq-client understands. */
export function parseAmqpUrl(url: URL): { exchange: string; clientUrl: string } {
  let exchange = 'livepipe';
  for (const [key, value] of url.searchParams) {
    if (key === 'exchange') {
      if (!EXCHANGE_NAME.test(value)) {
        throw new RelayError('bad-request', `amqp:// option exchange=${JSON.stringify(value)} is not an exchange name (1 to 255 of A-Z a-z 0-9 _ . : -)`);
      }
      exchange = value;
    } else if (CLIENT_PARAMS.includes(key)) {
      if (!/^\d+$/.test(value)) throw new RelayError('bad-request', `amqp:// option ${key}=${JSON.stringify(value)} must be a whole number`);
    } else {
      throw new RelayError('bad-request', `unknown amqp:// option ${JSON.stringify(key)} (known: exchange, ${CLIENT_PARAMS.join(', ')})`);
    }
  }
  const client = new URL(url.href.replace(/^rabbit:/i, 'amqp:'));
  client.searchParams.delete('exchange');
  return { exchange, clientUrl: client.href };
}

export class AmqpBroker implements Broker {
  readonly scheme = 'amqp';
  /** The server-named queue of the current connection ('' while reconnecting); for diagnostics and tests. */
  queueName = '';
  private readonly topics = new Map<string, Set<SubscriptionListener>>();
  private readonly publisher: Publisher;
  private channel: Channel | undefined;
  private outage = false;
  private closing: Promise<void> | undefined;
  private readonly conn: Connection;
  private readonly exchange: string;
  private readonly log: NonNullable<BrokerOptions['log']>;

  constructor(conn: Connection, exchange: string, log: BrokerOptions['log'] = () => {}) {
    this.conn = conn;
    this.exchange = exchange;
    this.log = log;
    // Every (re)connection declares the exchange too, so publishing never hits a missing exchange.
    this.publisher = conn.createPublisher({ confirm: true, exchanges: [this.exchangeDeclaration()] });
    conn.on('error', (err: Error) => this.log('warn', 'RabbitMQ connection error', { error: err.message }));
  }

  /** Connects and sets up the queue; rejects (and closes) when RabbitMQ cannot be reached. */
  async start(timeoutMs: number): Promise<void> {
    try {
      await this.conn.onConnect(timeoutMs, true); // true: our close() closes it (closing twice would hang)
      await this.setup();
    } catch (err) {
      await this.close();
      const cause = (err as Error).cause instanceof Error ? ` (${((err as Error).cause as Error).message})` : '';
      throw new RelayError('broker-unavailable', `cannot connect to RabbitMQ: ${(err as Error).message}${cause}`, { cause: err });
    }
  }

  topicProblem(topic: string): string | undefined {
    return amqpTopicProblem(topic);
  }

  async subscribe(topic: string, listener: SubscriptionListener): Promise<BrokerSubscription> {
    this.check(topic);
    const channel = this.channel;
    if (channel === undefined) throw new RelayError('subscription-failure', 'not connected to RabbitMQ (reconnecting)', { topic });
    let listeners = this.topics.get(topic);
    if (listeners === undefined) this.topics.set(topic, (listeners = new Set()));
    listeners.add(listener);
    // A binding is idempotent, so binding again for a second listener of the same topic is harmless.
    try {
      await channel.queueBind({ exchange: this.exchange, queue: this.queueName, routingKey: topic });
    } catch (err) {
      this.remove(topic, listener);
      throw new RelayError('subscription-failure', `RabbitMQ refused to bind ${JSON.stringify(topic)}: ${(err as Error).message}`, { topic, cause: err });
    }
    let open = true;
    return {
      close: async () => {
        if (!open) return;
        open = false;
        if (!this.remove(topic, listener) || !this.channel?.active) return;
        // The queue (and so the binding) is gone anyway if the channel drops meanwhile.
        await this.channel.queueUnbind({ exchange: this.exchange, queue: this.queueName, routingKey: topic }).catch(() => {});
      },
    };
  }

  async publish(topic: string, body: Uint8Array): Promise<void> {
    this.check(topic);
    // A Buffer, not a Uint8Array: rabbitmq-client would JSON-encode anything that is not a Buffer.
    const bytes = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
    try {
      await this.publisher.send({ exchange: this.exchange, routingKey: topic }, bytes);
    } catch (err) {
      throw new RelayError('broker-unavailable', `RabbitMQ did not accept the message: ${(err as Error).message}`, { topic, cause: err });
    }
  }

  isConnected(): boolean {
    return this.closing === undefined && this.channel?.active === true && this.conn.ready;
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      const channel = this.channel;
      this.channel = undefined;
      this.topics.clear();
      if (channel?.active) {
        // Exclusive + auto-delete would remove it with the connection; deleting it says so plainly.
        await channel.queueDelete({ queue: this.queueName }).catch(() => {});
        await channel.close().catch(() => {});
      }
      await this.publisher.close().catch(() => {});
      await this.conn.close().catch(() => {});
    })();
    return this.closing;
  }

  private exchangeDeclaration() {
    return { exchange: this.exchange, type: 'topic', durable: true };
  }

  /** Opens a channel, declares the exchange and a fresh queue, binds every live topic, starts consuming. */
  private async setup(): Promise<void> {
    const channel = await this.conn.acquire();
    try {
      await channel.exchangeDeclare(this.exchangeDeclaration());
      const { queue } = await channel.queueDeclare({ queue: '', exclusive: true, autoDelete: true });
      for (const topic of this.topics.keys()) await channel.queueBind({ exchange: this.exchange, queue, routingKey: topic });
      await channel.basicConsume({ queue, noAck: true, exclusive: true }, (msg) => this.deliver(msg));
      if (!channel.active || this.closing !== undefined) throw new Error('channel closed during setup');
      this.queueName = queue;
    } catch (err) {
      await channel.close().catch(() => {});
      throw err;
    }
    channel.once('close', () => this.lost(channel));
    // The server cancels the consumer when the queue is deleted under us (e.g. from the management UI).
    channel.once('basic.cancel', () => void channel.close().catch(() => {}));
    this.channel = channel;
  }

  private deliver(msg: AsyncMessage): void {
    const listeners = this.topics.get(msg.routingKey);
    if (listeners === undefined) return; // a binding being removed, or one made for a topic that was just unsubscribed
    const body: unknown = msg.body;
    const bytes = Buffer.isBuffer(body) ? body : Buffer.from(typeof body === 'string' ? body : JSON.stringify(body), 'utf8');
    for (const listener of listeners) listener.message(bytes);
  }

  /** The channel closed under us (connection lost, server restart, channel error): report once, rebuild. */
  private lost(channel: Channel): void {
    if (this.channel !== channel || this.closing !== undefined) return;
    this.channel = undefined;
    this.queueName = '';
    if (!this.outage) {
      this.outage = true;
      this.log('warn', 'lost the RabbitMQ channel; reconnecting');
      for (const [topic, listeners] of this.topics) {
        for (const listener of listeners) listener.error(new RelayError('subscription-failure', 'lost the connection to RabbitMQ; reconnecting', { topic }));
      }
    }
    void this.recover();
  }

  private async recover(): Promise<void> {
    for (let attempt = 1; this.closing === undefined; attempt++) {
      try {
        await this.setup();
        break;
      } catch (err) {
        this.log('warn', 'RabbitMQ setup failed; retrying', { error: (err as Error).message, attempt });
        await new Promise((resolve) => setTimeout(resolve, Math.min(250 * 2 ** attempt, RETRY_MAX_MS)));
      }
    }
    if (this.closing !== undefined) return;
    this.outage = false;
    this.log('info', 'RabbitMQ subscriptions restored', { queue: this.queueName, topics: this.topics.size });
    for (const listeners of this.topics.values()) {
      for (const listener of listeners) listener.recovered();
    }
  }

  /** Forgets one listener; true when it was the topic's last one. */
  private remove(topic: string, listener: SubscriptionListener): boolean {
    const listeners = this.topics.get(topic);
    if (listeners === undefined || !listeners.delete(listener)) return false;
    if (listeners.size > 0) return false;
    this.topics.delete(topic);
    return true;
  }

  private check(topic: string): void {
    if (this.closing !== undefined) throw new RelayError('broker-unavailable', 'the broker is closed', { topic });
    const problem = amqpTopicProblem(topic);
    if (problem !== undefined) throw new RelayError('invalid-topic', `invalid topic ${JSON.stringify(topic)}: ${problem}`, { topic });
  }
}

export const open: BrokerOpener = async (url, options) => {
  const { exchange, clientUrl } = parseAmqpUrl(url);
  const { Connection } = await importPeer<RabbitModule>('rabbitmq-client', url.protocol.replace(/:$/, ''));
  const conn = new Connection({ url: clientUrl, connectionName: `livepipe-${randomBytes(6).toString('hex')}`, retryHigh: RETRY_MAX_MS });
  const broker = new AmqpBroker(conn, exchange, options.log);
  await broker.start(10_000);
  return broker;
};
