import { randomBytes } from 'node:crypto';
import { unescape } from 'node:querystring';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Channel, ChannelModel, ConfirmChannel, ConsumeMessage } from 'amqplib';
import { RelayError } from '../errors.ts';
import { importPeer } from './broker.ts';
import type { Broker, BrokerOpener, ControlBus, BrokerOptions, BrokerSubscription, SubscriptionListener } from './broker.ts';

/**
 * RabbitMQ (AMQP 0-9-1): `amqp://user:pass@host:5672/vhost`, `amqps://…`, or `rabbit://…` (the Go
 * CDK's name for the same thing), on amqplib.
 *
 * Broadcast: each driver instance (relay process) owns ONE exclusive, auto-delete, server-named
 * queue, bound to a durable topic exchange (`?exchange=`, default `livepipe`) once per subscribed
 * topic with the topic as routing key. Publishing sends to the exchange with the topic as routing
 * key, with publisher confirms.
 *
 * Bodies are handed over as the raw bytes the broker carried, whatever their content-type, so JSON
 * from other publishers keeps its whitespace and its big integers.
 *
 * Reconnection is ours: the queue and its bindings die with the connection, and a deleted queue or
 * exchange breaks delivery with the connection still up, which amqplib's optional `recovery` (it
 * only reconnects) does not cover. On loss the driver reports once, reconnects with capped, jittered
 * exponential backoff, declares the exchange and a new queue, binds every live topic again, consumes,
 * and reports recovery. Publishing fails fast (broker-unavailable) while it is down or while
 * RabbitMQ blocks publishers (a resource alarm).
 *
 * Two channels per connection: one only consumes; the other (with confirms) publishes, binds and
 * unbinds. A channel error there (a refused publish or binding, e.g. a topic permission or
 * max_message_size) closes only that channel, which is reopened on next use, so it does not
 * interrupt delivery for every other subscriber.
 */

type AmqpModule = typeof import('amqplib');

const MAX_ROUTING_KEY_BYTES = 255; // an AMQP shortstr
const EXCHANGE_NAME = /^[A-Za-z0-9_.:-]{1,255}$/;
// URL query parameters (whole numbers) and the amqplib URL parameter each one becomes.
const CLIENT_PARAMS: Record<string, string | undefined> = { heartbeat: 'heartbeat', channel_max: 'channelMax', connection_timeout: undefined };
const CONNECT_TIMEOUT_MS = 10_000;
const RETRY_FIRST_MS = 100;
const RETRY_MAX_MS = 10_000;
const NOT_FOUND = 404; // AMQP reply code

export function amqpTopicProblem(topic: string): string | undefined {
  const bytes = Buffer.byteLength(topic, 'utf8');
  if (bytes > MAX_ROUTING_KEY_BYTES) return `AMQP routing keys are at most ${MAX_ROUTING_KEY_BYTES} bytes (this one is ${bytes})`;
  if (topic.split('.').some((word) => word === '*' || word === '#')) {
    return 'the dot-separated words * and # are wildcards in AMQP topic bindings and cannot be part of a topic';
  }
  return undefined;
}

/** Splits the broker URL into the exchange name, the URL that amqplib understands, and the connect timeout. */
export function parseAmqpUrl(url: URL): { exchange: string; clientUrl: string; connectTimeoutMs: number } {
  let exchange = 'livepipe';
  let connectTimeoutMs = CONNECT_TIMEOUT_MS;
  const client = new URL(url.href.replace(/^rabbit:/i, 'amqp:'));
  client.search = '';
  for (const [key, value] of url.searchParams) {
    if (key === 'exchange') {
      if (!EXCHANGE_NAME.test(value)) {
        throw new RelayError('bad-request', `amqp:// option exchange=${JSON.stringify(value)} is not an exchange name (1 to 255 of A-Z a-z 0-9 _ . : -)`);
      }
      exchange = value;
    } else if (Object.hasOwn(CLIENT_PARAMS, key)) {
      if (!/^\d+$/.test(value)) throw new RelayError('bad-request', `amqp:// option ${key}=${JSON.stringify(value)} must be a whole number`);
      const param = CLIENT_PARAMS[key];
      if (param === undefined) connectTimeoutMs = Number(value);
      else client.searchParams.set(param, value);
    } else {
      throw new RelayError('bad-request', `unknown amqp:// option ${JSON.stringify(key)} (known: exchange, ${Object.keys(CLIENT_PARAMS).join(', ')})`);
    }
  }
  return { exchange, clientUrl: client.href, connectTimeoutMs };
}

/** One connection and what lives on it; replaced as a whole after a loss. */
interface Link {
  readonly conn: ChannelModel;
  queue: string;
  /** The confirm channel for publish/bind/unbind, opened on demand. */
  ops: Promise<Ops> | undefined;
  /** The connection or the consuming channel closed. */
  dead: boolean;
  /** Why RabbitMQ stopped reading publishes on this connection (a resource alarm), while it does. */
  blocked: string | undefined;
}

interface Sub {
  readonly listener: SubscriptionListener;
  /** subscribe() resolved: the listener is owed outage and recovery reports. */
  ready: boolean;
}

interface Ops {
  readonly channel: ConfirmChannel;
  /** Set while amqplib asks us to stop publishing (its write buffer is full); settles on 'drain' or close. */
  drained: Promise<void> | undefined;
  /** Why the server closed the channel: amqplib fails its unconfirmed publishes with just "channel closed". */
  failure: Error | undefined;
}

export class AmqpBroker implements Broker {
  readonly scheme = 'amqp';
  /** Node-to-node messages travel as any topic's: this driver creates and retains nothing for them. */
  get control(): ControlBus {
    return this;
  }
  /** The server-named queue of the current connection ('' while reconnecting); for diagnostics and tests. */
  queueName = '';
  /** Topic → its subscriptions; a topic is bound while it has any, including ones still subscribing. */
  private readonly topics = new Map<string, Set<Sub>>();
  private link: Link | undefined;
  private recovering: Promise<void> | undefined;
  private closing: Promise<void> | undefined;
  private readonly stop = new AbortController();
  private readonly amqp: AmqpModule;
  private readonly url: string;
  private readonly exchange: string;
  private readonly connectTimeoutMs: number;
  private readonly connectionName = `livepipe-${randomBytes(6).toString('hex')}`;
  private readonly log: NonNullable<BrokerOptions['log']>;

  constructor(amqp: AmqpModule, url: URL, log: BrokerOptions['log'] = () => {}) {
    const { exchange, clientUrl, connectTimeoutMs } = parseAmqpUrl(url);
    this.amqp = amqp;
    this.url = clientUrl;
    this.exchange = exchange;
    this.connectTimeoutMs = connectTimeoutMs;
    this.log = log;
  }

  /** Connects and sets up the queue once; rejects (and closes) when RabbitMQ cannot be reached. */
  async start(): Promise<void> {
    try {
      await this.connect();
    } catch (err) {
      await this.close();
      throw new RelayError('broker-unavailable', `cannot connect to RabbitMQ: ${this.explain(err as Error)}`, { cause: err });
    }
  }

  /** amqplib's wording for two common startup failures, in the user's terms. */
  private explain(err: Error): string {
    if (err.message === 'connect ETIMEDOUT') return `no AMQP handshake within ${this.connectTimeoutMs} ms (connection_timeout)`;
    if (/got <ConnectionClose/.test(err.message)) {
      // amqplib drops the server's reason; this is what RabbitMQ refuses at that step.
      const vhost = unescape(new URL(this.url).pathname.slice(1)) || '/';
      return `RabbitMQ refused to open virtual host ${JSON.stringify(vhost)} (it does not exist, or the user has no access to it)`;
    }
    return err.message;
  }

  topicProblem(topic: string): string | undefined {
    return amqpTopicProblem(topic);
  }

  async subscribe(topic: string, listener: SubscriptionListener): Promise<BrokerSubscription> {
    this.check(topic);
    const link = this.link;
    if (link === undefined) throw new RelayError('subscription-failure', 'not connected to RabbitMQ (reconnecting)', { topic });
    // Registered before binding, so that an unsubscribe of the topic meanwhile does not unbind it.
    const sub: Sub = { listener, ready: false };
    let subs = this.topics.get(topic);
    if (subs === undefined) this.topics.set(topic, (subs = new Set()));
    subs.add(sub);
    // A binding is idempotent, so binding again for a second listener of the same topic is harmless.
    try {
      const { channel } = await this.ops(link);
      await channel.bindQueue(link.queue, this.exchange, topic);
      if (this.link !== link) throw new Error('lost the connection to RabbitMQ');
    } catch (err) {
      this.remove(topic, sub);
      throw new RelayError('subscription-failure', `RabbitMQ refused to bind ${JSON.stringify(topic)}: ${(err as Error).message}`, { topic, cause: err });
    }
    sub.ready = true; // from now on it hears of outages (before, this rejection tells it)
    let open = true;
    return {
      close: async () => {
        if (!open) return;
        open = false;
        const link = this.link;
        if (!this.remove(topic, sub) || link === undefined) return;
        // The queue (and so the binding) is gone anyway if the connection drops meanwhile.
        await this.ops(link)
          .then(({ channel }) => channel.unbindQueue(link.queue, this.exchange, topic))
          .catch(() => {});
      },
    };
  }

  async publish(topic: string, body: Uint8Array): Promise<void> {
    this.check(topic);
    const unavailable = (why: string, cause?: unknown) =>
      new RelayError('broker-unavailable', `RabbitMQ did not accept the message: ${why}`, { topic, cause });
    let ops: Ops;
    for (;;) {
      const link = this.link;
      if (link === undefined) throw unavailable('not connected to RabbitMQ (reconnecting)');
      // Fail fast rather than hang: RabbitMQ would hold this publish until the alarm clears.
      if (link.blocked !== undefined) throw unavailable(`RabbitMQ is blocking publishers (${link.blocked})`);
      try {
        ops = await this.ops(link);
      } catch (err) {
        throw unavailable((err as Error).message, err);
      }
      if (ops.drained === undefined) break;
      await ops.drained; // flow control: wait until amqplib's buffer drained (or the channel closed), then look again
    }
    const bytes = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
    await new Promise<void>((resolve, reject) => {
      const confirmed = (err: Error | null) => (err === null ? resolve() : reject(unavailable((ops.failure ?? err).message, err)));
      let more: boolean;
      try {
        more = ops.channel.publish(this.exchange, topic, bytes, {}, confirmed);
      } catch (err) {
        reject(unavailable((err as Error).message, err)); // the channel closed since ops() returned
        return;
      }
      if (!more) ops.drained ??= drainOf(ops);
    });
  }

  isConnected(): boolean {
    return this.closing === undefined && this.link !== undefined;
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      this.stop.abort();
      const link = this.link;
      this.link = undefined;
      this.topics.clear();
      await this.recovering;
      if (link === undefined) return;
      // Exclusive + auto-delete would remove it with the connection; deleting it says so plainly.
      await this.ops(link)
        .then(({ channel }) => channel.deleteQueue(link.queue))
        .catch(() => {});
      await link.conn.close().catch(() => {});
    })();
    return this.closing;
  }

  /** Connects, declares the exchange and a fresh queue, binds every live topic, starts consuming. */
  private async connect(): Promise<void> {
    const conn = await this.amqp.connect(this.url, { timeout: this.connectTimeoutMs, clientProperties: { connection_name: this.connectionName } });
    const link: Link = { conn, queue: '', ops: undefined, dead: false, blocked: undefined };
    const lost = (why: string) => {
      if (link.dead) return;
      link.dead = true;
      this.lost(link, why);
    };
    // amqplib emits 'error' before 'close' for a failure; 'close' alone for a clean close.
    conn.on('error', (err: Error) => this.log('warn', 'RabbitMQ connection error', { error: err.message }));
    conn.on('close', () => lost('connection closed'));
    conn.on('blocked', (reason: string) => {
      link.blocked = reason || 'resource alarm';
      this.log('warn', 'RabbitMQ blocked publishing', { reason });
    });
    conn.on('unblocked', () => {
      link.blocked = undefined;
      this.log('info', 'RabbitMQ unblocked publishing');
    });
    try {
      const consumer: Channel = await conn.createChannel();
      consumer.on('error', (err: Error) => this.log('warn', 'RabbitMQ channel error', { error: err.message }));
      consumer.on('close', () => lost('channel closed'));
      const { channel } = await this.ops(link);
      await channel.assertExchange(this.exchange, 'topic', { durable: true });
      const { queue } = await channel.assertQueue('', { exclusive: true, autoDelete: true });
      link.queue = queue;
      for (const topic of this.topics.keys()) await channel.bindQueue(queue, this.exchange, topic);
      // null: the server cancelled the consumer (the queue was deleted); start over on a new connection.
      await consumer.consume(queue, (msg) => (msg === null ? void conn.close().catch(() => {}) : this.deliver(msg)), { noAck: true, exclusive: true });
      if (link.dead) throw new Error('the connection closed during setup');
      if (this.closing !== undefined) throw new Error('closed');
    } catch (err) {
      link.dead = true;
      await conn.close().catch(() => {});
      throw err;
    }
    this.link = link;
    this.queueName = link.queue;
  }

  /** The connection's publish/bind channel, opened on first use and again after a channel error. */
  private ops(link: Link): Promise<Ops> {
    if (link.ops !== undefined) return link.ops;
    const forget = () => {
      if (link.ops === opening) link.ops = undefined;
    };
    const opening: Promise<Ops> = link.conn.createConfirmChannel().then((channel) => {
      const ops: Ops = { channel, drained: undefined, failure: undefined };
      channel.on('error', (err: Error & { code?: number }) => {
        ops.failure = err;
        this.log('warn', 'RabbitMQ publish channel error', { error: err.message });
        // 404: the exchange is gone, and every binding with it; only a full setup brings them back.
        if (err.code === NOT_FOUND) void link.conn.close().catch(() => {});
      });
      channel.on('close', forget);
      return ops;
    });
    opening.catch(forget);
    link.ops = opening;
    return opening;
  }

  private deliver(msg: ConsumeMessage): void {
    const subs = this.topics.get(msg.fields.routingKey);
    if (subs === undefined) return; // a binding being removed, or one made for a topic that was just unsubscribed
    for (const { listener } of subs) listener.message(msg.content);
  }

  /** The connection or the consuming channel closed under us: report once per outage, rebuild. */
  private lost(link: Link, why: string): void {
    if (this.link !== link || this.closing !== undefined) return;
    this.link = undefined;
    this.queueName = '';
    void link.conn.close().catch(() => {}); // when only the consuming channel closed
    // Once per outage: only an established link gets here, and the next one is established only by
    // recover(), which reports the recovery.
    this.log('warn', `lost RabbitMQ (${why}); reconnecting`);
    for (const [topic, subs] of this.topics) {
      for (const { listener, ready } of subs) {
        if (ready) listener.error(new RelayError('subscription-failure', 'lost the connection to RabbitMQ; reconnecting', { topic }));
      }
    }
    this.recovering ??= this.recover().finally(() => (this.recovering = undefined));
  }

  private async recover(): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      // Capped exponential backoff, jittered over its upper half so that relays restarting together spread out.
      const ceiling = Math.min(RETRY_FIRST_MS * 2 ** attempt, RETRY_MAX_MS);
      try {
        await sleep(ceiling / 2 + Math.random() * (ceiling / 2), undefined, { signal: this.stop.signal });
        await this.connect();
        break;
      } catch (err) {
        if (this.closing !== undefined) return;
        this.log('warn', 'RabbitMQ reconnect failed; retrying', { error: (err as Error).message, attempt: attempt + 1 });
      }
    }
    this.log('info', 'RabbitMQ subscriptions restored', { queue: this.queueName, topics: this.topics.size });
    for (const subs of this.topics.values()) {
      for (const { listener, ready } of subs) if (ready) listener.recovered();
    }
  }

  /** Forgets one subscription; true when it was the topic's last one. */
  private remove(topic: string, sub: Sub): boolean {
    const subs = this.topics.get(topic);
    if (subs === undefined || !subs.delete(sub)) return false;
    if (subs.size > 0) return false;
    this.topics.delete(topic);
    return true;
  }

  private check(topic: string): void {
    if (this.closing !== undefined) throw new RelayError('broker-unavailable', 'the broker is closed', { topic });
    const problem = amqpTopicProblem(topic);
    if (problem !== undefined) throw new RelayError('invalid-topic', `invalid topic ${JSON.stringify(topic)}: ${problem}`, { topic });
  }
}

/** Settles when amqplib may take more messages on this channel: on 'drain', or on close (publishing then fails fast). */
function drainOf(ops: Ops): Promise<void> {
  return new Promise<void>((resolve) => {
    const done = () => {
      ops.channel.off('drain', done);
      ops.channel.off('close', done);
      ops.drained = undefined;
      resolve();
    };
    ops.channel.on('drain', done);
    ops.channel.on('close', done);
  });
}

export const open: BrokerOpener = async (url, options) => {
  parseAmqpUrl(url); // bad options are a bad-request, before the client library is even loaded
  const amqp = await importPeer<AmqpModule>('amqplib', url.protocol.replace(/:$/, ''));
  const broker = new AmqpBroker(amqp, url, options.log);
  await broker.start();
  return broker;
};
