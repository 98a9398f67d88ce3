import { isUtf8 } from 'node:buffer';
import { randomBytes } from 'node:crypto';
import type { Client, ClientConfig, Notification, Pool } from 'pg';
import { RelayError } from '../errors.ts';
import { backoff, importPeer } from './broker.ts';
import type { Broker, BrokerOpener, ControlBus, BrokerOptions, BrokerSubscription, SubscriptionListener } from './broker.ts';

/**
 * PostgreSQL LISTEN / NOTIFY: `postgres://user:pass@host:5432/db` or `postgresql://…` (pg's own URL
 * parameters such as sslmode apply).
 *
 * One dedicated listening connection per driver instance holds a LISTEN per subscribed topic; when it
 * drops, the driver reconnects with backoff and LISTENs again. Publishing runs `SELECT pg_notify($1, $2)`
 * on a second connection (a pool of one, which reconnects on demand). NOTIFY is broadcast: every listening session sees
 * every notification committed after its LISTEN. Both connections carry the application_name
 * `livepipe-<random>` unless the URL sets one.
 *
 * Channels: a topic is the channel name, quoted as an identifier, so case, dots and quotes are kept;
 * Postgres limits identifiers to 63 bytes (NAMEDATALEN - 1) and would silently truncate longer ones.
 *
 * Bodies: a NOTIFY payload is text of at most 7999 bytes, without NUL. A body that is valid UTF-8
 * without NUL is sent as that text, so the payload is the body (and a text NOTIFY from any other client
 * arrives unchanged). Any other body, and a text body that itself starts with the marker, is sent as
 * the marker U+0001 `base64:` followed by its base64 (so at most 5991 bytes), and decoded on receipt. A
 * foreign payload that starts with the marker and holds canonical base64 is therefore decoded too: the
 * one exception, for text that starts with a control character.
 */

type PgModule = typeof import('pg');

const MAX_CHANNEL_BYTES = 63;
const MAX_PAYLOAD_BYTES = 7999;
const BINARY_MARKER = '\u0001base64:';
/** The largest body that fits once base64-encoded behind the marker. */
export const MAX_BINARY_BODY_BYTES = Math.floor((MAX_PAYLOAD_BYTES - BINARY_MARKER.length) / 4) * 3;

export function postgresTopicProblem(topic: string): string | undefined {
  const bytes = Buffer.byteLength(topic, 'utf8');
  if (bytes > MAX_CHANNEL_BYTES) return `Postgres channel names are at most ${MAX_CHANNEL_BYTES} bytes (NAMEDATALEN - 1; this one is ${bytes})`;
  return undefined;
}

/** The NOTIFY payload that carries `body`. */
export function encodePayload(body: Uint8Array): string {
  const bytes = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
  if (isUtf8(bytes) && !bytes.includes(0)) {
    const text = bytes.toString('utf8');
    if (!text.startsWith(BINARY_MARKER)) return text;
  }
  return BINARY_MARKER + bytes.toString('base64');
}

export function decodePayload(payload: string): Buffer {
  if (payload.startsWith(BINARY_MARKER)) {
    const base64 = payload.slice(BINARY_MARKER.length);
    const bytes = Buffer.from(base64, 'base64');
    if (bytes.toString('base64') === base64) return bytes;
  }
  return Buffer.from(payload, 'utf8');
}

export class PostgresBroker implements Broker {
  readonly scheme = 'postgres';
  /** Node-to-node messages travel as any topic's: this driver creates and retains nothing for them. */
  get control(): ControlBus {
    return this;
  }
  readonly applicationName = `livepipe-${randomBytes(6).toString('hex')}`;
  private readonly topics = new Map<string, Set<SubscriptionListener>>();
  private readonly pg: PgModule;
  private readonly config: ClientConfig;
  private readonly pool: Pool;
  private readonly log: NonNullable<BrokerOptions['log']>;
  private listening: Client | undefined;
  private outage = false;
  private closing: Promise<void> | undefined;

  constructor(pg: PgModule, connectionString: string, log: BrokerOptions['log'] = () => {}) {
    this.pg = pg;
    this.log = log;
    // The URL's own parameters override these (pg merges the parsed connection string last).
    this.config = { connectionString, application_name: this.applicationName, connectionTimeoutMillis: 10_000, keepAlive: true };
    // One publishing connection: publishes are sent, and so delivered, in the order they were issued.
    this.pool = new pg.Pool({ ...this.config, max: 1 });
    this.pool.on('error', (err) => this.log('warn', 'Postgres publishing connection failed', { error: err.message }));
  }

  /** Opens the listening connection; rejects (and closes) when Postgres cannot be reached. */
  async start(): Promise<void> {
    try {
      this.listening = await this.connect();
    } catch (err) {
      await this.close();
      throw new RelayError('broker-unavailable', `cannot connect to Postgres: ${(err as Error).message}`, { cause: err });
    }
  }

  topicProblem(topic: string): string | undefined {
    return postgresTopicProblem(topic);
  }

  async subscribe(topic: string, listener: SubscriptionListener): Promise<BrokerSubscription> {
    this.check(topic);
    const client = this.listening;
    if (client === undefined) throw new RelayError('subscription-failure', 'not connected to Postgres (reconnecting)', { topic });
    let listeners = this.topics.get(topic);
    if (listeners === undefined) this.topics.set(topic, (listeners = new Set()));
    listeners.add(listener);
    try {
      // LISTEN is idempotent; once it returns, every later NOTIFY on the channel reaches this session.
      await client.query(`LISTEN ${this.pg.escapeIdentifier(topic)}`);
    } catch (err) {
      this.remove(topic, listener);
      throw new RelayError('subscription-failure', `Postgres refused to LISTEN on ${JSON.stringify(topic)}: ${(err as Error).message}`, { topic, cause: err });
    }
    let open = true;
    return {
      close: async () => {
        if (!open) return;
        open = false;
        if (!this.remove(topic, listener)) return;
        // A lost connection took its LISTENs with it.
        await this.listening?.query(`UNLISTEN ${this.pg.escapeIdentifier(topic)}`).catch(() => {});
      },
    };
  }

  async publish(topic: string, body: Uint8Array): Promise<void> {
    this.check(topic);
    const payload = encodePayload(body);
    const bytes = Buffer.byteLength(payload, 'utf8');
    if (bytes > MAX_PAYLOAD_BYTES) {
      const form = payload.startsWith(BINARY_MARKER) ? `, at most ${MAX_BINARY_BODY_BYTES} bytes for a body that is not UTF-8 text (sent as base64)` : '';
      throw new RelayError('too-large', `a Postgres NOTIFY payload is at most ${MAX_PAYLOAD_BYTES} bytes${form}; this body needs ${bytes}`, { topic });
    }
    try {
      await this.pool.query('SELECT pg_notify($1, $2)', [topic, payload]);
    } catch (err) {
      throw new RelayError('broker-unavailable', `Postgres did not accept the notification: ${(err as Error).message}`, { topic, cause: err });
    }
  }

  isConnected(): boolean {
    return this.closing === undefined && this.listening !== undefined;
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      const client = this.listening;
      this.listening = undefined;
      this.topics.clear();
      // Ending the session drops its LISTENs.
      await client?.end().catch(() => {});
      await this.pool.end().catch(() => {});
    })();
    return this.closing;
  }

  /** A new listening connection, LISTENing on every live topic. */
  private async connect(): Promise<Client> {
    const client = new this.pg.Client(this.config);
    client.on('notification', (n) => this.deliver(n));
    client.on('error', (err) => this.lost(client, err));
    client.on('end', () => this.lost(client));
    try {
      await client.connect();
      for (const topic of this.topics.keys()) await client.query(`LISTEN ${this.pg.escapeIdentifier(topic)}`);
    } catch (err) {
      await client.end().catch(() => {});
      throw err;
    }
    return client;
  }

  private deliver(n: Notification): void {
    const listeners = this.topics.get(n.channel);
    if (listeners === undefined) return; // an UNLISTEN on its way
    const body = decodePayload(n.payload ?? '');
    for (const listener of listeners) listener.message(body);
  }

  /** The listening connection failed or ended under us: report once, then reconnect. */
  private lost(client: Client, err?: Error): void {
    if (this.listening !== client || this.closing !== undefined) return;
    this.listening = undefined;
    void client.end().catch(() => {});
    if (!this.outage) {
      this.outage = true;
      this.log('warn', 'lost the Postgres listening connection; reconnecting', { error: err?.message });
      for (const [topic, listeners] of this.topics) {
        for (const listener of listeners) listener.error(new RelayError('subscription-failure', 'lost the connection to Postgres; reconnecting', { topic }));
      }
    }
    void this.recover();
  }

  private async recover(): Promise<void> {
    for (let attempt = 1; this.closing === undefined; attempt++) {
      await backoff(attempt);
      if (this.closing !== undefined) return;
      try {
        const client = await this.connect();
        if (this.closing !== undefined) {
          await client.end().catch(() => {});
          return;
        }
        this.listening = client;
        break;
      } catch (err) {
        this.log('warn', 'Postgres reconnect failed; retrying', { error: (err as Error).message, attempt });
      }
    }
    if (this.closing !== undefined) return;
    this.outage = false;
    this.log('info', 'Postgres LISTENs restored', { topics: this.topics.size });
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
    const problem = postgresTopicProblem(topic);
    if (problem !== undefined) throw new RelayError('invalid-topic', `invalid topic ${JSON.stringify(topic)}: ${problem}`, { topic });
  }
}

export const open: BrokerOpener = async (url, options) => {
  const encoding = url.searchParams.get('client_encoding');
  if (encoding !== null && !/^utf-?8$/i.test(encoding)) {
    throw new RelayError('bad-request', `postgres:// option client_encoding=${JSON.stringify(encoding)} is not supported: the driver exchanges topics and payloads as UTF-8`);
  }
  const pg = await importPeer<PgModule>('pg', url.protocol.replace(/:$/, ''));
  const broker = new PostgresBroker(pg, url.href, options.log);
  await broker.start();
  return broker;
};
