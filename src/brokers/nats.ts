import { RelayError } from '../errors.ts';
import { importPeer } from './broker.ts';
import type { Broker, BrokerOpener, BrokerReplay, ControlBus, BrokerOptions, BrokerSubscription, SubscriptionListener } from './broker.ts';
import type * as Nats from '@nats-io/transport-node';
import type * as JetStream from '@nats-io/jetstream';

/**
 * NATS: `nats://[user:pass@]host[:port]` (a user without a password is sent as a token).
 * Topics map 1:1 to subjects; a topic that is not a valid literal subject is rejected, never
 * rewritten.
 *
 * Core mode (the default): one core subscription per topic; at-most-once, nothing retained.
 *
 * JetStream mode, `?jetstream=<stream>` (`1` names the stream `livepipe`, `0` means core): topics
 * are subjects of that stream, so the server retains what is published to them. Each topic is
 * read through its own ordered consumer (ephemeral, in memory, no acks) that starts right
 * after the stream's last message when subscribe() is called, i.e. DeliverPolicy new.
 * After a reconnect or a server restart the consumer resumes from the last message it
 * delivered, so nothing the stream kept meanwhile is lost. A topic must lie within the
 * stream's subjects (read once at open). A missing stream is created from
 * `&subjects=<filter>,<filter>` (file storage, 24 h max age); that option is required then,
 * because NATS servers refuse a catch-all `>` stream, and ignored for an existing stream.
 * close() deletes the consumers, never the stream: its retained messages are the point of this
 * mode. A relay that dies without close() leaves its consumers until the server drops them
 * after 5 minutes without a pull (the client's inactivity threshold).
 */

const DEFAULT_STREAM = 'livepipe';
const CREATED_STREAM_MAX_AGE_NS = 24 * 60 * 60 * 1e9;
const OPTIONS = ['jetstream', 'subjects'];

interface Mode {
  stream: string;
  /** The subject filters of the stream: topics must match one of them. */
  subjects: string[];
  jet: typeof JetStream;
  jsm: JetStream.JetStreamManager;
  js: JetStream.JetStreamClient;
}

interface Entry {
  topic: string;
  listener: SubscriptionListener;
  /** Reported broken with listener.error and not yet recovered. */
  failed: boolean;
  /** JetStream only: the consumer asked for messages since it failed (so it exists again). */
  pulled: boolean;
  stop(): Promise<void>;
}

/** Why `topic` is not a valid literal NATS subject, or undefined. */
function subjectProblem(topic: string): string | undefined {
  if (/[ \t\r\n\f]/.test(topic)) return 'a NATS subject must not contain whitespace';
  if (/[*>]/.test(topic)) return 'a NATS subject must not contain * or > (wildcards would widen the subscription)';
  if (topic.split('.').includes('')) return 'a NATS subject must not have empty tokens (no leading, trailing or double dots)';
  return undefined;
}

/** True when the subject filter `filter` (with `*` and `>` wildcards) matches the literal `subject`. */
function filterMatches(filter: string, subject: string): boolean {
  const f = filter.split('.');
  const s = subject.split('.');
  for (let i = 0; i < f.length; i++) {
    if (f[i] === '>') return s.length > i;
    if (i >= s.length || (f[i] !== '*' && f[i] !== s[i])) return false;
  }
  return f.length === s.length;
}

export class NatsBroker implements Broker {
  readonly scheme = 'nats';
  private readonly nc: Nats.NatsConnection;
  private readonly mode: Mode | undefined;
  private readonly log: BrokerOptions['log'];
  private readonly entries = new Set<Entry>();
  private connected = true;
  /** Counts connection changes, so that a late flush cannot report a recovery that a newer outage voided. */
  private generation = 0;
  private closed = false;

  constructor(nc: Nats.NatsConnection, mode: Mode | undefined, log: BrokerOptions['log']) {
    this.nc = nc;
    this.mode = mode;
    this.log = log;
    void this.watch();
  }

  topicProblem(topic: string): string | undefined {
    const problem = subjectProblem(topic);
    if (problem !== undefined || this.mode === undefined) return problem;
    if (this.mode.subjects.some((f) => filterMatches(f, topic))) return undefined;
    return `in JetStream mode a topic must be a subject of stream ${this.mode.stream} (${this.mode.subjects.join(', ')})`;
  }

  async subscribe(topic: string, listener: SubscriptionListener): Promise<BrokerSubscription> {
    this.check(topic, 'subscription-failure');
    return this.track(topic, this.mode === undefined ? await this.subscribeCore(topic, listener) : await this.subscribeStream(this.mode, topic, listener));
  }

  /** Core NATS subjects even in JetStream mode: node-to-node messages are not for the stream to keep. */
  readonly control: ControlBus = {
    subscribe: async (topic, listener) => {
      this.checkConnected(topic, 'subscription-failure');
      return this.track(topic, await this.subscribeCore(topic, listener));
    },
    // Not flushed: at most once is all node-to-node messages need, and a PING round trip per message cost a third of a stream open.
    publish: async (topic, body) => {
      this.checkConnected(topic, 'broker-unavailable');
      try {
        this.nc.publish(topic, body);
      } catch (err) {
        throw new RelayError('broker-unavailable', `NATS did not accept the message on ${topic}: ${(err as Error).message}`, { topic, cause: err });
      }
    },
  };

  /** JetStream mode only (see Broker.replay): one short-lived ordered consumer per topic reads what the stream holds. */
  get replay(): Broker['replay'] {
    const mode = this.mode;
    if (mode === undefined) return undefined;
    return async (topics, position, limit) => {
      const info = await mode.jsm.streams.info(mode.stream);
      const last = info.state.last_seq;
      // Messages the stream dropped (age, size limits) might have been on these topics.
      let complete = info.state.first_seq <= position + 1;
      const messages: BrokerReplay['messages'] = [];
      for (const topic of last > position ? topics : []) {
        const consumer = await mode.js.consumers.get(mode.stream, {
          filter_subjects: topic,
          deliver_policy: mode.jet.DeliverPolicy.StartSequence,
          opt_start_seq: position + 1,
        });
        try {
          // Read up to the stream's end as it was when asked (later messages arrive live), in
          // batches no larger than what is pending, so that no fetch waits for more.
          let pending = (await consumer.info()).num_pending;
          while (pending > 0 && messages.length <= limit) {
            const batch = await consumer.fetch({ max_messages: Math.min(pending, limit + 1, 256), expires: 5000 });
            let got = 0;
            for await (const m of batch) {
              got++;
              if (m.seq <= last) messages.push({ topic, body: m.data, position: m.seq });
              pending = m.seq >= last ? 0 : m.info.pending;
              if (pending === 0) break;
            }
            if (got === 0) break;
          }
        } finally {
          await consumer.delete().catch(() => {});
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

  private async track(topic: string, entry: Entry): Promise<BrokerSubscription> {
    if (this.closed) {
      await entry.stop();
      throw new RelayError('broker-unavailable', 'the broker was closed during subscribe', { topic });
    }
    this.entries.add(entry);
    let closing: Promise<void> | undefined;
    return {
      close: () => {
        this.entries.delete(entry);
        return (closing ??= entry.stop());
      },
    };
  }

  private async subscribeCore(topic: string, listener: SubscriptionListener): Promise<Entry> {
    const entry: Entry = { topic, listener, failed: false, pulled: false, stop: async () => {} };
    const sub = this.nc.subscribe(topic, {
      callback: (err, msg) => {
        if (err) {
          // Only a permission violation reaches here: the client has dropped the subscription for good.
          this.fail(entry, `NATS refused the subscription to ${topic}: ${err.message}`);
          this.entries.delete(entry);
          return;
        }
        listener.message(msg.data);
      },
    });
    entry.stop = async () => {
      sub.unsubscribe();
      if (this.connected && !this.nc.isClosed()) await this.nc.flush().catch(() => {});
    };
    // The server answers PING after it has processed the SUB (or refused it).
    await this.nc.flush().catch((err: unknown) => {
      sub.unsubscribe();
      throw new RelayError('subscription-failure', `could not subscribe to NATS subject ${topic}: ${(err as Error).message}`, { topic, cause: err });
    });
    if (sub.isClosed()) {
      const why = await sub.closed;
      throw new RelayError('subscription-failure', `NATS refused the subscription to ${topic}${why ? `: ${why.message}` : ''}`, { topic });
    }
    return entry;
  }

  private async subscribeStream(mode: Mode, topic: string, listener: SubscriptionListener): Promise<Entry> {
    const entry: Entry = { topic, listener, failed: false, pulled: false, stop: async () => {} };
    let consumer: JetStream.Consumer;
    try {
      // DeliverPolicy new, stated as a start sequence: the client recreates an ordered consumer
      // from its last delivered sequence, which with DeliverPolicy new would be 0 (the whole
      // stream) if the consumer is lost before its first message.
      const info = await mode.jsm.streams.info(mode.stream);
      consumer = await mode.js.consumers.get(mode.stream, {
        filter_subjects: topic,
        deliver_policy: mode.jet.DeliverPolicy.StartSequence,
        opt_start_seq: info.state.last_seq + 1,
      });
    } catch (err) {
      throw new RelayError('subscription-failure', `could not create a JetStream consumer on stream ${mode.stream} for ${topic}: ${(err as Error).message}`, { topic, cause: err });
    }
    // The consumer exists on the server from here on, so every later message reaches it.
    const messages = await consumer.consume({ callback: (m) => listener.message(m.data, m.seq) });
    void (async () => {
      for await (const n of messages.status()) {
        if (n.type === 'next') {
          entry.pulled = true;
          this.recoverStream(entry);
        } else if (n.type === 'heartbeats_missed' || n.type === 'consumer_deleted' || n.type === 'consumer_not_found' || n.type === 'stream_not_found') {
          this.fail(entry, `the JetStream consumer for ${topic} broke (${n.type}); recreating it`);
        }
      }
    })();
    entry.stop = async () => {
      await messages.close();
      // The consumer's current name (the client renames it when it recreates it).
      if (this.connected && !this.nc.isClosed()) await consumer.delete().catch(() => {});
    };
    return entry;
  }

  async publish(topic: string, body: Uint8Array): Promise<void> {
    this.check(topic, 'broker-unavailable');
    try {
      if (this.mode !== undefined) {
        await this.mode.js.publish(topic, body);
      } else {
        this.nc.publish(topic, body);
        await this.nc.flush();
      }
    } catch (err) {
      throw new RelayError('broker-unavailable', `NATS did not accept the message on ${topic}: ${(err as Error).message}`, { topic, cause: err });
    }
  }

  isConnected(): boolean {
    return !this.closed && this.connected && !this.nc.isClosed();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const entries = [...this.entries];
    this.entries.clear();
    await Promise.all(entries.map((e) => e.stop().catch(() => {})));
    await this.nc.close();
  }

  private check(topic: string, unavailable: 'subscription-failure' | 'broker-unavailable'): void {
    if (this.closed) throw new RelayError('broker-unavailable', 'the broker is closed', { topic });
    const problem = this.topicProblem(topic);
    if (problem !== undefined) throw new RelayError('invalid-topic', `invalid topic ${JSON.stringify(topic)}: ${problem}`, { topic });
    this.checkConnected(topic, unavailable);
  }

  private checkConnected(topic: string, unavailable: 'subscription-failure' | 'broker-unavailable'): void {
    if (this.closed) throw new RelayError('broker-unavailable', 'the broker is closed', { topic });
    if (!this.isConnected()) throw new RelayError(unavailable, 'the connection to NATS is down; retrying', { topic });
  }

  private fail(entry: Entry, message: string): void {
    entry.pulled = false;
    if (entry.failed || !this.entries.has(entry)) return;
    entry.failed = true;
    entry.listener.error(new RelayError('subscription-failure', message, { topic: entry.topic }));
  }

  private recoverStream(entry: Entry): void {
    if (!entry.failed || !entry.pulled || !this.connected) return;
    entry.failed = false;
    entry.listener.recovered();
  }

  /** Turns connection status changes into error / recovered reports. */
  private async watch(): Promise<void> {
    for await (const s of this.nc.status()) {
      if (s.type === 'disconnect') {
        this.connected = false;
        this.generation++;
        this.log?.('warn', 'lost the connection to NATS; reconnecting', { server: s.server });
        for (const e of this.entries) this.fail(e, `lost the connection to NATS (${s.server}); reconnecting`);
      } else if (s.type === 'reconnect') {
        this.connected = true;
        const generation = ++this.generation;
        this.log?.('info', 'reconnected to NATS', { server: s.server });
        if (this.mode !== undefined) {
          for (const e of this.entries) this.recoverStream(e);
          continue;
        }
        // The client re-sent every SUB before reporting the reconnect; a flush proves the server has them.
        this.nc.flush().then(() => {
          if (generation !== this.generation) return;
          for (const e of this.entries) {
            if (!e.failed) continue;
            e.failed = false;
            e.listener.recovered();
          }
        }, () => {});
      }
    }
  }
}

async function streamMode(nc: Nats.NatsConnection, url: URL, log: BrokerOptions['log']): Promise<Mode | undefined> {
  const param = url.searchParams.get('jetstream');
  const subjectsParam = url.searchParams.get('subjects');
  if (param === null || param === '0') {
    if (subjectsParam !== null) throw new RelayError('bad-request', 'the nats:// option subjects= applies only with jetstream=<stream>');
    return undefined;
  }
  const stream = param === '1' ? DEFAULT_STREAM : param;
  if (!/^[A-Za-z0-9_-]+$/.test(stream)) {
    throw new RelayError('bad-request', `nats:// option jetstream=${JSON.stringify(param)}: a stream name uses only letters, digits, _ and - (or 1 for "${DEFAULT_STREAM}")`);
  }
  const wanted = subjectsParam?.split(',');
  const jet = await importPeer<typeof JetStream>('@nats-io/jetstream', 'nats');
  const jsm = await jet.jetstreamManager(nc);
  let info: JetStream.StreamInfo;
  try {
    info = await jsm.streams.info(stream);
  } catch (err) {
    if ((err as { code?: number }).code !== jet.JetStreamApiCodes.StreamNotFound) throw err;
    if (wanted === undefined) {
      throw new RelayError('bad-request', `JetStream stream ${stream} does not exist; create it, or add &subjects=<filter>,… to the nats:// URL so that the relay creates it`);
    }
    try {
      info = await jsm.streams.add({ name: stream, subjects: wanted, storage: jet.StorageType.File, max_age: CREATED_STREAM_MAX_AGE_NS });
    } catch (addErr) {
      // Another relay may have created it meanwhile; otherwise the server refused the subjects.
      info = await jsm.streams.info(stream).catch(() => {
        throw new RelayError('bad-request', `could not create JetStream stream ${stream} with subjects ${wanted.join(', ')}: ${(addErr as Error).message}`, { cause: addErr });
      });
    }
  }
  const subjects = info.config.subjects ?? [];
  if (subjects.length === 0) throw new RelayError('bad-request', `JetStream stream ${stream} has no subjects (a mirror or sourced stream cannot back topics)`);
  if (wanted !== undefined && wanted.join(',') !== subjects.join(',')) {
    log?.('warn', `JetStream stream ${stream} exists with other subjects than subjects= names; using the stream's`, { subjects });
  }
  return { stream, subjects, jet, jsm, js: jet.jetstream(nc) };
}

export const open: BrokerOpener = async (url, options) => {
  for (const key of url.searchParams.keys()) {
    if (!OPTIONS.includes(key)) throw new RelayError('bad-request', `unknown nats:// option ${key} (known: ${OPTIONS.join(', ')})`);
  }
  const nats = await importPeer<typeof Nats>('@nats-io/transport-node', 'nats');
  const user = decodeURIComponent(url.username);
  const pass = decodeURIComponent(url.password);
  let nc: Nats.NatsConnection;
  try {
    nc = await nats.connect({
      servers: url.host || '127.0.0.1:4222',
      ...(user !== '' && pass !== '' ? { user, pass } : user !== '' ? { token: user } : {}),
      name: 'livepipe',
      // A relay outlives any broker restart: keep trying for ever.
      maxReconnectAttempts: -1,
    });
  } catch (err) {
    throw new RelayError('broker-unavailable', `could not connect to NATS at ${url.host}: ${(err as Error).message}`, { cause: err });
  }
  try {
    return new NatsBroker(nc, await streamMode(nc, url, options.log), options.log);
  } catch (err) {
    await nc.close();
    throw err instanceof RelayError ? err : new RelayError('broker-unavailable', `could not set up JetStream on NATS at ${url.host}: ${(err as Error).message}`, { cause: err });
  }
};
