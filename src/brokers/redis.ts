import { randomBytes } from 'node:crypto';
import { RelayError } from '../errors.ts';
import { importPeer } from './broker.ts';
import type { Broker, BrokerOpener, BrokerReplay, ControlBus, BrokerOptions, BrokerSubscription, SubscriptionListener } from './broker.ts';
import { TopicEntries } from './topic-entries.ts';
import type { TopicEntry } from './topic-entries.ts';
import type * as IORedis from 'ioredis';

/**
 * Redis: `redis://[user:pass@]host[:port][/db]`, or `rediss://` for TLS. Every topic is
 * representable: channel names and keys are binary-safe.
 *
 * Pub/sub mode (the default): a topic is a channel. One subscriber connection per driver
 * instance SUBSCRIBEs each topic; a second connection PUBLISHes. At-most-once, nothing retained.
 *
 * Streams mode, `?streams=1`: a topic is a stream key, and a message is one entry whose field
 * `body` holds the body (`XADD <topic> * body <bytes>`; entries without it are skipped).
 * Publishing trims the stream to about `&maxlen=<n>` entries (default 10000, `MAXLEN ~`).
 * subscribe() starts after the stream's last entry (XREAD's `$`, pinned to an id so that no
 * entry between two reads is missed); one connection reads every subscribed stream with a
 * blocking XREAD and resumes from the last id it delivered after a reconnect, so entries
 * added meanwhile are not lost. Nothing is created for subscribing; the streams themselves
 * are the retained data and stay.
 */

const OPTIONS = ['streams', 'maxlen'];
const DEFAULT_MAXLEN = 10_000;
const BODY_FIELD = 'body';
const BLOCK_MS = 5_000;
const BATCH = 100;
const SEQ_PER_MS = 1024;

type Redis = IORedis.Redis;

/** `ready` settles once the broker delivers this topic (SUBSCRIBE answered, or stream position taken). */
interface Topic extends TopicEntry {
  /** Streams mode: the id of the last entry delivered (at first, of the last one before subscribing). */
  position: string | undefined;
}

export class RedisBroker implements Broker {
  readonly scheme: string;
  /** Pub/sub mode only: in streams mode every topic is a retained stream. */
  get control(): ControlBus | undefined {
    return this.maxlen === undefined ? this : undefined;
  }
  /** CLIENT SETNAME of this instance's connections, to find them in CLIENT LIST. */
  readonly clientName: string;
  private readonly pub: Redis;
  /** The subscriber connection (pub/sub) or the blocking reader (streams). */
  private readonly receiver: Redis;
  /** Streams mode when defined: the approximate MAXLEN of XADD. */
  private readonly maxlen: number | undefined;
  private readonly log: BrokerOptions['log'];
  private readonly topics = new TopicEntries<Topic>();
  private outage = false;
  private lastError = '';
  private closed = false;
  // Streams mode: the reader's CLIENT ID (for CLIENT UNBLOCK when the topic set grows) and
  // how to wake the read loop when it waits for a first topic.
  private readerId: number | undefined;
  private readerEpoch = 0;
  private wake: (() => void) | undefined;

  constructor(scheme: string, clientName: string, pub: Redis, receiver: Redis, maxlen: number | undefined, log: BrokerOptions['log']) {
    this.scheme = scheme;
    this.clientName = clientName;
    this.pub = pub;
    this.receiver = receiver;
    this.maxlen = maxlen;
    this.log = log;
    for (const c of [pub, receiver]) c.on('error', (err: Error) => (this.lastError = err.message));
    receiver.on('close', () => this.beginOutage());
    receiver.on('ready', () => this.endOutage());
    if (maxlen === undefined) {
      receiver.on('messageBuffer', (channel: Buffer, message: Buffer) => {
        for (const l of this.topics.get(channel.toString())?.listeners ?? []) l.message(message);
      });
    } else {
      void this.readLoop();
    }
  }

  topicProblem(): string | undefined {
    return undefined;
  }

  async subscribe(topic: string, listener: SubscriptionListener): Promise<BrokerSubscription> {
    this.assertUsable(topic, 'subscription-failure');
    const subscription = await this.topics.joinWhenReady(topic, listener, {
      create: () => ({ listeners: new Set(), ready: Promise.resolve(), position: undefined }),
      start: (entry) => this.start(topic, entry).catch((err: unknown) => {
        throw err instanceof RelayError ? err : new RelayError('subscription-failure', `could not subscribe to ${topic} on Redis: ${(err as Error).message}`, { topic, cause: err });
      }),
      release: () => this.release(topic),
    });
    // The topic's last other subscriber may have left meanwhile: start over.
    return subscription ?? this.subscribe(topic, listener);
  }

  private async start(topic: string, entry: Topic): Promise<void> {
    if (this.maxlen === undefined) {
      await this.receiver.subscribe(topic);
      return;
    }
    // A key of another type would make every XREAD of this connection fail.
    const type = await this.pub.type(topic);
    if (type !== 'none' && type !== 'stream') throw new RelayError('subscription-failure', `Redis key ${topic} holds a ${type}, not a stream`, { topic });
    const last = await this.pub.xrevrange(topic, '+', '-', 'COUNT', 1);
    entry.position = last[0]?.[0] ?? '0-0';
    // Make a read that is blocked on the old topic set start over with this one.
    if (this.readerId !== undefined) void this.pub.client('UNBLOCK', this.readerId).catch(() => {});
    this.wake?.();
  }

  /** The topic's last listener left. */
  private async release(topic: string): Promise<void> {
    if (this.maxlen !== undefined || this.closed) return;
    // During an outage the server holds no subscription; the command then waits for the reconnect.
    const done = this.receiver.unsubscribe(topic);
    if (this.receiver.status === 'ready') await done;
    else done.catch(() => {});
  }

  async publish(topic: string, body: Uint8Array): Promise<void> {
    this.assertUsable(topic, 'broker-unavailable');
    const bytes = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
    try {
      if (this.maxlen === undefined) await this.pub.publish(topic, bytes);
      else await this.pub.xadd(topic, 'MAXLEN', '~', this.maxlen, '*', BODY_FIELD, bytes);
    } catch (err) {
      throw new RelayError('broker-unavailable', `Redis did not accept the message on ${topic}: ${(err as Error).message}`, { topic, cause: err });
    }
  }

  isConnected(): boolean {
    return !this.closed && this.pub.status === 'ready' && this.receiver.status === 'ready';
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.topics.clear();
    this.wake?.();
    // Closing the connections drops their subscriptions and blocked reads on the server.
    await Promise.all([end(this.pub), end(this.receiver)]);
  }

  private assertUsable(topic: string, unavailable: 'subscription-failure' | 'broker-unavailable'): void {
    if (this.closed) throw new RelayError('broker-unavailable', 'the broker is closed', { topic });
    if (!this.isConnected()) throw new RelayError(unavailable, `the connection to Redis is down${this.lastError ? ` (${this.lastError})` : ''}; retrying`, { topic });
  }

  private beginOutage(): void {
    if (this.closed || this.outage) return;
    this.outage = true;
    const message = `lost the connection to Redis${this.lastError ? ` (${this.lastError})` : ''}; reconnecting`;
    this.log?.('warn', message);
    this.topics.failAll((topic) => new RelayError('subscription-failure', message, { topic }));
  }

  private endOutage(): void {
    this.readerEpoch++; // a new connection: the read loop asks for its CLIENT ID again
    if (!this.outage) return;
    // Pub/sub: ioredis has re-sent SUBSCRIBE for every channel before 'ready'; a PING answered
    // after them proves they are in place. Streams: it has re-sent the pending XREAD, which
    // reads on from the positions (a PING would wait behind that blocking read).
    const confirmed = this.maxlen === undefined ? this.receiver.ping() : Promise.resolve();
    confirmed.then(() => {
      if (!this.outage || this.receiver.status !== 'ready') return;
      this.outage = false;
      this.log?.('info', 'reconnected to Redis');
      this.topics.recoverAll();
    }, () => {});
  }

  /** Streams mode only (see Broker.replay): what the streams still hold after `position`. */
  get replay(): Broker['replay'] {
    if (this.maxlen === undefined) return undefined;
    return async (topics, position, limit, lastTopic) => {
      // Exact on the last message's stream; on the others, from the start of its millisecond:
      // entry ids of two streams made in one millisecond do not say which came first.
      const after = `(${streamId(position)}`;
      const sameMillisecond = streamId(position - (position % SEQ_PER_MS));
      const messages: BrokerReplay['messages'] = [];
      let complete = true;
      for (const topic of topics) {
        const [entries, info] = await Promise.all([
          this.pub.xrangeBuffer(topic, topic === lastTopic ? after : sameMillisecond, '+', 'COUNT', limit + 1),
          this.pub.call('XINFO', 'STREAM', topic).catch(() => undefined) as Promise<unknown[] | undefined>,
        ]);
        // MAXLEN trims the oldest entries: when some were trimmed and the oldest one left is after the position, some in between may be gone.
        const field = (name: string) => info?.[info.indexOf(name) + 1];
        const trimmed = Number(field('entries-added')) > Number(field('length'));
        const first = field('recorded-first-entry-id');
        if (trimmed && typeof first === 'string' && streamPosition(first) > position) complete = false;
        for (const [id, fields] of entries as Array<[Buffer, Buffer[]]>) {
          const at = fields.findIndex((f, i) => i % 2 === 0 && f.toString() === BODY_FIELD);
          if (at >= 0) messages.push({ topic, body: fields[at + 1]!, position: streamPosition(id.toString()) });
        }
      }
      messages.sort((a, b) => a.position - b.position);
      if (messages.length > limit) {
        complete = false;
        messages.splice(0, messages.length - limit);
      }
      return { messages, complete };
    };
  }

  /** Streams mode: reads every subscribed stream from its position, one blocking XREAD at a time. */
  private async readLoop(): Promise<void> {
    let epoch = -1;
    while (!this.closed) {
      // Only topics whose start position is known: a read from 0-0 would replay the whole stream.
      const reading = [...this.topics].filter(([, t]) => t.position !== undefined);
      if (reading.length === 0) {
        await new Promise<void>((resolve) => (this.wake = resolve));
        this.wake = undefined;
        continue;
      }
      try {
        if (epoch !== this.readerEpoch) {
          epoch = this.readerEpoch;
          this.readerId = Number(await this.receiver.client('ID'));
        }
        const keys = reading.map(([k]) => k);
        const read = new Set(reading.map(([, t]) => t));
        const reply = await this.receiver.xreadBuffer('COUNT', BATCH, 'BLOCK', BLOCK_MS, 'STREAMS', ...keys, ...reading.map(([, t]) => t.position!));
        for (const [key, items] of (reply ?? []) as Array<[Buffer, Array<[Buffer, Buffer[]]>]>) {
          const entry = this.topics.get(key.toString());
          if (entry === undefined || !read.has(entry)) continue;
          for (const [id, fields] of items) {
            entry.position = id.toString();
            const at = fields.findIndex((f, i) => i % 2 === 0 && f.toString() === BODY_FIELD);
            if (at < 0) {
              this.log?.('warn', `skipped Redis stream entry ${entry.position} of ${key.toString()}: it has no ${BODY_FIELD} field`);
              continue;
            }
            const position = streamPosition(entry.position);
            for (const l of entry.listeners) l.message(fields[at + 1]!, position);
          }
        }
      } catch (err) {
        if (this.closed) return;
        if ((err as Error).message.startsWith('WRONGTYPE')) {
          await this.dropNonStreams().catch(() => {});
          continue;
        }
        this.log?.('warn', `reading Redis streams failed: ${(err as Error).message}; retrying`);
        await new Promise((resolve) => setTimeout(resolve, 1000));
      }
    }
  }

  /** A key replaced by another type fails every XREAD of the set: stop reading just that topic. */
  private async dropNonStreams(): Promise<void> {
    for (const [topic, entry] of this.topics) {
      const type = await this.pub.type(topic);
      if (type === 'none' || type === 'stream') continue;
      this.topics.delete(topic);
      const error = new RelayError('subscription-failure', `Redis key ${topic} now holds a ${type}, not a stream; no longer reading it`, { topic });
      for (const l of entry.listeners) l.error(error);
    }
  }
}

/**
 * A stream entry id `<ms>-<seq>` as one number that orders entries across streams: ms × 1024 +
 * seq (a seq past 1023 within one millisecond counts as 1023). Ids of different streams made in
 * the same millisecond cannot be ordered by Redis itself either.
 */
export function streamPosition(id: string): number {
  const [ms, seq] = id.split('-').map(Number);
  return ms! * SEQ_PER_MS + Math.min(seq ?? 0, SEQ_PER_MS - 1);
}

function streamId(position: number): string {
  return `${Math.floor(position / SEQ_PER_MS)}-${position % SEQ_PER_MS}`;
}

/** Disconnects `client`; resolves once its socket is closed ('end' comes only if one was open). */
function end(client: Redis): Promise<void> {
  const open = ['wait', 'connecting', 'connect', 'ready'].includes(client.status);
  const ended = open ? new Promise<void>((resolve) => client.once('end', () => resolve())) : Promise.resolve();
  client.disconnect();
  return ended;
}

function parseOptions(url: URL): number | undefined {
  for (const key of url.searchParams.keys()) {
    if (!OPTIONS.includes(key)) throw new RelayError('bad-request', `unknown ${url.protocol}// option ${key} (known: ${OPTIONS.join(', ')})`);
  }
  const streams = url.searchParams.get('streams') ?? '0';
  const maxlen = url.searchParams.get('maxlen');
  if (streams !== '0' && streams !== '1') throw new RelayError('bad-request', `${url.protocol}// option streams=${JSON.stringify(streams)}: use 1 for Redis Streams or 0 for pub/sub`);
  if (streams === '0') {
    if (maxlen !== null) throw new RelayError('bad-request', `${url.protocol}// option maxlen applies only with streams=1`);
    return undefined;
  }
  if (maxlen === null) return DEFAULT_MAXLEN;
  if (!/^[1-9][0-9]{0,9}$/.test(maxlen)) throw new RelayError('bad-request', `${url.protocol}// option maxlen=${JSON.stringify(maxlen)}: a positive whole number of entries`);
  return Number(maxlen);
}

export const open: BrokerOpener = async (url, options) => {
  const scheme = url.protocol.replace(/:$/, '');
  const maxlen = parseOptions(url);
  const { Redis } = await importPeer<typeof IORedis>('ioredis', scheme);
  const server = new URL(url);
  server.search = '';
  const clientName = `livepipe-${randomBytes(6).toString('hex')}`;
  // Commands wait through a reconnect instead of failing after 20 retries; publish and
  // subscribe refuse up front while a connection is down.
  const connect = () => new Redis(server.href, { lazyConnect: true, connectionName: clientName, maxRetriesPerRequest: null });
  const pub = connect();
  const receiver = connect();
  const broker = new RedisBroker(scheme, clientName, pub, receiver, maxlen, options.log);
  try {
    await Promise.all([pub.connect(), receiver.connect()]);
  } catch (err) {
    await broker.close();
    throw new RelayError('broker-unavailable', `could not connect to Redis at ${server.host}: ${(err as Error).message}`, { cause: err });
  }
  return broker;
};
