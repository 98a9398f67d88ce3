import { randomBytes } from 'node:crypto';
import { RelayError } from '../errors.ts';
import { importPeer } from './broker.ts';
import type { Broker, BrokerOpener, BrokerOptions, BrokerSubscription, SubscriptionListener } from './broker.ts';
import { restore, TopicEntries } from './topic-entries.ts';
import type { RestorableEntry } from './topic-entries.ts';

/**
 * Azure Service Bus: `azuresb://<namespace>` (`<namespace>.servicebus.windows.net`, or a full
 * host name). Credentials, first found wins: a SAS key in the URL
 * (`azuresb://<KeyName>:<Key>@<namespace>`, URL-encoded), the connection string in
 * `SERVICEBUS_CONNECTION_STRING` (then the namespace may be left out: `azuresb://`), or
 * DefaultAzureCredential when the optional npm package @azure/identity is installed. The
 * identity needs Manage rights: the driver creates its own subscriptions.
 * Options: `?create_topics=false`.
 *
 * Topics are Service Bus topics, used by name: 1 to 260 of a-z 0-9 . - _ /, starting and
 * ending with a letter or digit. Upper case is refused because Service Bus names ignore
 * case (`Chat` and `chat` would be one topic); other topics are rejected, never rewritten.
 *
 * Broadcast: each driver instance (relay process) creates its OWN subscription per topic,
 * `livepipe-<instance>-<n>`, with auto-delete after 5 idle minutes (so a relay that dies
 * without close() leaves nothing for long), and deletes it on close. A missing topic is
 * created on subscribe and publish unless `?create_topics=false`.
 *
 * Delivery: peek-lock, and each message is completed once the listeners have it (so a
 * message whose completion fails comes again: at-least-once). Bodies are read raw
 * (skipParsingBodyAsJson): a binary (AMQP data) body arrives byte for byte; an AMQP value
 * body (a string sent by an SDK as a value) arrives as UTF-8, other values as JSON. Note that
 * @azure/service-bus itself JSON-encodes a string body into a data section, so a JavaScript
 * publisher should send a Buffer/Uint8Array to have the bytes arrive unchanged.
 */

/** The parts of @azure/service-bus this driver uses: the seam its tests fake. */
export interface SbMessage {
  body: unknown;
}
export interface SbHandlers {
  processMessage(message: SbMessage): Promise<void>;
  processError(args: { error: Error; errorSource: string }): Promise<void>;
}
export interface SbReceiver {
  subscribe(handlers: SbHandlers, options: { autoCompleteMessages: boolean; maxConcurrentCalls: number }): { close(): Promise<void> };
  completeMessage(message: SbMessage): Promise<void>;
  close(): Promise<void>;
}
export interface SbSender {
  sendMessages(message: { body: Uint8Array }): Promise<void>;
  close(): Promise<void>;
}
export interface SbClient {
  createReceiver(topic: string, subscription: string, options: { receiveMode: 'peekLock'; skipParsingBodyAsJson: boolean }): SbReceiver;
  createSender(topic: string): SbSender;
  close(): Promise<void>;
}
export interface SbAdmin {
  getNamespaceProperties(): Promise<unknown>;
  topicExists(topic: string): Promise<boolean>;
  createTopic(topic: string): Promise<unknown>;
  subscriptionExists(topic: string, subscription: string): Promise<boolean>;
  createSubscription(topic: string, subscription: string, options: { autoDeleteOnIdle: string }): Promise<unknown>;
  deleteSubscription(topic: string, subscription: string): Promise<unknown>;
}

type ServiceBusModule = typeof import('@azure/service-bus');
interface IdentityModule {
  DefaultAzureCredential: new () => unknown;
}

// Service Bus's shortest auto-delete-on-idle interval.
export const AUTO_DELETE_ON_IDLE = 'PT5M';
const MAX_TOPIC_LENGTH = 260;
const OPTIONS = ['create_topics'];
// Codes (ServiceBusError, and RestError's for a failed request) that mean the namespace did not answer.
const CONNECTIVITY_CODES = ['ServiceCommunicationProblem', 'ServiceTimeout', 'ServiceBusy', 'REQUEST_SEND_ERROR'];

/** Why `topic` is not a Service Bus topic name this driver accepts, or undefined. */
export function serviceBusTopicProblem(topic: string): string | undefined {
  if (topic.length > MAX_TOPIC_LENGTH) return `a Service Bus topic name is at most ${MAX_TOPIC_LENGTH} characters (this one is ${topic.length})`;
  if (/[A-Z]/.test(topic)) return 'Service Bus topic names ignore case, so topics must be lower case (Chat and chat would be one topic)';
  if (!/^[a-z0-9._/-]+$/.test(topic)) return 'a Service Bus topic name holds only a-z 0-9 . - _ /';
  if (!/^[a-z0-9](.*[a-z0-9])?$/.test(topic)) return 'a Service Bus topic name starts and ends with a letter or digit';
  return undefined;
}

export interface AzureSbUrl {
  /** Host name of the namespace, '' when it is to come from the connection string. */
  host: string;
  /** From the URL's user:password (a SAS key), if any. */
  connectionString: string | undefined;
  createTopics: boolean;
}

export function parseAzureSbUrl(url: URL): AzureSbUrl {
  let createTopics = true;
  for (const [key, value] of url.searchParams) {
    if (key === 'create_topics' && (value === 'true' || value === 'false')) createTopics = value === 'true';
    else if (key === 'create_topics') throw new RelayError('bad-request', `azuresb:// option create_topics=${JSON.stringify(value)} must be true or false`);
    else throw new RelayError('bad-request', `unknown azuresb:// option ${JSON.stringify(key)} (known: ${OPTIONS.join(', ')})`);
  }
  if (url.pathname.replace(/^\/$/, '') !== '') throw new RelayError('bad-request', `azuresb:// takes a namespace and no path (topics name the Service Bus topics); got ${JSON.stringify(url.href)}`);
  const name = decodeURIComponent(url.hostname).toLowerCase();
  const host = name === '' || name.includes('.') ? name : `${name}.servicebus.windows.net`;
  let connectionString: string | undefined;
  if (url.username !== '' || url.password !== '') {
    if (host === '' || url.username === '' || url.password === '') {
      throw new RelayError('bad-request', 'azuresb:// credentials in the URL take the form azuresb://<KeyName>:<Key>@<namespace>');
    }
    connectionString = `Endpoint=sb://${host}/;SharedAccessKeyName=${decodeURIComponent(url.username)};SharedAccessKey=${decodeURIComponent(url.password)}`;
  }
  return { host, connectionString, createTopics };
}

/** The namespace host named by a connection string's Endpoint, or ''. */
export function connectionStringHost(connectionString: string): string {
  const endpoint = /(?:^|;)\s*Endpoint\s*=\s*([^;]+)/i.exec(connectionString)?.[1] ?? '';
  try {
    return new URL(endpoint.trim()).hostname.toLowerCase();
  } catch {
    return '';
  }
}

/**
 * How to authenticate: a connection string (URL first, then `env`), else DefaultAzureCredential
 * from @azure/identity, loaded through `loadIdentity`.
 */
export async function resolveAuth(
  parsed: AzureSbUrl,
  env: Record<string, string | undefined>,
  loadIdentity: () => Promise<IdentityModule>,
): Promise<{ host: string; connectionString: string } | { host: string; credential: unknown }> {
  const connectionString = parsed.connectionString ?? env.SERVICEBUS_CONNECTION_STRING;
  if (connectionString !== undefined && connectionString !== '') {
    const host = connectionStringHost(connectionString);
    if (host === '') throw new RelayError('bad-request', 'the Service Bus connection string has no Endpoint=sb://<namespace>/');
    if (parsed.host !== '' && parsed.host !== host) {
      throw new RelayError('bad-request', `azuresb://${parsed.host} does not match the namespace of SERVICEBUS_CONNECTION_STRING (${host})`);
    }
    return { host, connectionString };
  }
  if (parsed.host === '') throw new RelayError('bad-request', 'azuresb:// needs a namespace (azuresb://<namespace>) or SERVICEBUS_CONNECTION_STRING');
  let identity: IdentityModule;
  try {
    identity = await loadIdentity();
  } catch (err) {
    if (err instanceof RelayError && err.code === 'missing-client') {
      throw new RelayError('missing-client', `azuresb:// found no credentials: set SERVICEBUS_CONNECTION_STRING, put a SAS key in the URL (azuresb://<KeyName>:<Key>@<namespace>), or install @azure/identity for DefaultAzureCredential`, { cause: err });
    }
    throw err;
  }
  return { host: parsed.host, credential: new identity.DefaultAzureCredential() };
}

const codeOf = (err: unknown): string => String((err as { code?: unknown }).code ?? '');
const messageOf = (err: unknown): string => (err instanceof Error ? err.message : String(err));
// The AMQP client's ServiceBusError codes and the administration client's RestError codes.
const isNotFound = (err: unknown) => ['MessagingEntityNotFound', 'MessageEntityNotFoundError'].includes(codeOf(err)) || (err as { statusCode?: number }).statusCode === 404;
const isAlreadyThere = (err: unknown) => ['MessagingEntityAlreadyExists', 'MessageEntityAlreadyExistsError'].includes(codeOf(err)) || (err as { statusCode?: number }).statusCode === 409;

/** A short reason for an SDK error, naming what the user can do about it. */
export function describeServiceBusError(err: unknown): string {
  const code = codeOf(err);
  if (code === 'UnauthorizedAccess' || code === 'UnauthorizedRequestError' || (err as { statusCode?: number }).statusCode === 401) {
    return `not authorized (the relay needs Manage rights: it creates its own subscriptions): ${messageOf(err)}`;
  }
  if (isNotFound(err)) return `the topic or subscription does not exist: ${messageOf(err)}`;
  if (code === 'ServiceCommunicationProblem') return `cannot reach the Service Bus namespace: ${messageOf(err)}`;
  return messageOf(err);
}

/** A received body as bytes: data sections as they are, values as UTF-8 text or JSON. */
export function bodyBytes(body: unknown): Uint8Array {
  if (body instanceof Uint8Array) return body; // Buffer included
  if (typeof body === 'string') return Buffer.from(body, 'utf8');
  return Buffer.from(JSON.stringify(body) ?? '', 'utf8');
}

interface Entry extends RestorableEntry {
  topic: string;
  name: string;
  receiver: SbReceiver | undefined;
  handle: { close(): Promise<void> } | undefined;
}

export class AzureSbBroker implements Broker {
  readonly scheme = 'azuresb';
  /** Part of every subscription name this instance creates (`livepipe-<instanceId>-<n>`, at most 50 characters). */
  readonly instanceId = randomBytes(6).toString('hex');
  private readonly entries = new TopicEntries<Entry>();
  private readonly senders = new Map<string, SbSender>();
  private seq = 0;
  /** False after a call failed for want of a connection, until one succeeds (for isConnected). */
  private reachable = true;
  private closing: Promise<void> | undefined;
  private readonly client: SbClient;
  private readonly admin: SbAdmin;
  private readonly createTopics: boolean;
  private readonly log: NonNullable<BrokerOptions['log']>;

  constructor(sdk: { client: SbClient; admin: SbAdmin }, createTopics: boolean, log: BrokerOptions['log'] = () => {}) {
    this.client = sdk.client;
    this.admin = sdk.admin;
    this.createTopics = createTopics;
    this.log = log;
  }

  /** One management call, so that a wrong namespace or credentials fail open(). */
  async start(): Promise<void> {
    try {
      await this.admin.getNamespaceProperties();
    } catch (err) {
      await this.client.close().catch(() => {});
      throw new RelayError('broker-unavailable', `cannot use the Service Bus namespace: ${describeServiceBusError(err)}`, { cause: err });
    }
  }

  topicProblem(topic: string): string | undefined {
    return serviceBusTopicProblem(topic);
  }

  async subscribe(topic: string, listener: SubscriptionListener): Promise<BrokerSubscription> {
    this.check(topic);
    return this.entries.join(topic, listener, {
      create: () => ({
        topic,
        name: `livepipe-${this.instanceId}-${++this.seq}`,
        listeners: new Set(),
        ready: Promise.resolve(),
        receiver: undefined,
        handle: undefined,
        failed: false,
        recovering: false,
        closed: false,
      }),
      start: (entry) => this.ensure(entry).then(() => this.listen(entry)),
      failure: (err) => new RelayError('subscription-failure', `cannot subscribe to Service Bus topic ${JSON.stringify(topic)}: ${describeServiceBusError(err)}`, { topic, cause: err }),
      dispose: (entry) => this.dispose(entry),
    });
  }

  async publish(topic: string, body: Uint8Array): Promise<void> {
    this.check(topic);
    let sender = this.senders.get(topic);
    if (sender === undefined) this.senders.set(topic, (sender = this.client.createSender(topic)));
    // A Uint8Array body goes as an AMQP data section: receivers get the bytes unchanged.
    const message = { body: Buffer.from(body.buffer, body.byteOffset, body.byteLength) };
    for (let attempt = 1; ; attempt++) {
      try {
        await sender.sendMessages(message);
        this.reachable = true;
        return;
      } catch (err) {
        this.noteFailure(err);
        if (isNotFound(err) && this.createTopics && attempt === 1) {
          await this.createTopic(topic).catch(() => {});
          continue;
        }
        if (codeOf(err) === 'MessageSizeExceeded') {
          throw new RelayError('too-large', `the message is larger than this Service Bus namespace accepts: ${messageOf(err)}`, { topic, cause: err });
        }
        throw new RelayError('broker-unavailable', `Service Bus did not accept the message: ${describeServiceBusError(err)}`, { topic, cause: err });
      }
    }
  }

  /** Whether Service Bus answered the last call (a subscription that was deleted does not count). */
  isConnected(): boolean {
    return this.closing === undefined && this.reachable;
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      await this.entries.disposeAll((entry) => this.dispose(entry));
      await Promise.all([...this.senders.values()].map((s) => s.close().catch(() => {})));
      this.senders.clear();
      await this.client.close().catch(() => {});
    })();
    return this.closing;
  }

  /** Creates the subscription (and, if allowed, a missing topic). */
  private async ensure(entry: Entry): Promise<void> {
    if (this.createTopics && !(await this.admin.topicExists(entry.topic))) await this.createTopic(entry.topic);
    try {
      await this.admin.createSubscription(entry.topic, entry.name, { autoDeleteOnIdle: AUTO_DELETE_ON_IDLE });
    } catch (err) {
      if (isAlreadyThere(err)) return;
      if (isNotFound(err) && !this.createTopics) {
        throw new RelayError('subscription-failure', `the Service Bus topic ${JSON.stringify(entry.topic)} does not exist (and create_topics=false)`, { topic: entry.topic, cause: err });
      }
      throw err;
    }
  }

  private async createTopic(topic: string): Promise<void> {
    try {
      await this.admin.createTopic(topic);
      this.log('info', 'created Service Bus topic', { topic });
    } catch (err) {
      if (!isAlreadyThere(err)) throw err;
    }
  }

  private listen(entry: Entry): void {
    if (entry.closed || this.closing !== undefined) return;
    const receiver = this.client.createReceiver(entry.topic, entry.name, { receiveMode: 'peekLock', skipParsingBodyAsJson: true });
    entry.receiver = receiver;
    entry.handle = receiver.subscribe({
      processMessage: async (message) => {
        if (entry.receiver !== receiver) return; // left over from a replaced receiver: it comes again
        this.reachable = true;
        if (entry.failed) this.recovered(entry);
        const bytes = bodyBytes(message.body);
        for (const listener of entry.listeners) listener.message(bytes);
        await receiver.completeMessage(message).catch((err: unknown) => this.settlementFailed(entry, 'complete', err));
      },
      processError: async ({ error, errorSource }) => {
        if (entry.receiver !== receiver) return;
        if (errorSource === 'receive') this.fail(entry, error);
        else this.settlementFailed(entry, errorSource, error);
      },
    }, { autoCompleteMessages: false, maxConcurrentCalls: 1 });
  }

  /** Settling or lock renewal failed: the message comes again once its lock expires; the link is fine. */
  private settlementFailed(entry: Entry, source: string, err: unknown): void {
    this.log('warn', 'Service Bus settlement failed; the message may be delivered again', { topic: entry.topic, source, error: messageOf(err) });
  }

  /** Receiving broke: report once, drop the receiver, rebuild in the background. */
  private fail(entry: Entry, err: unknown): void {
    if (entry.closed || this.closing !== undefined) return;
    this.noteFailure(err);
    void this.stopReceiver(entry);
    if (!entry.failed) {
      entry.failed = true;
      this.log('warn', 'Service Bus subscription failed; restoring', { topic: entry.topic, subscription: entry.name, error: messageOf(err) });
      for (const listener of entry.listeners) {
        listener.error(new RelayError('subscription-failure', `lost the Service Bus subscription: ${describeServiceBusError(err)}`, { topic: entry.topic }));
      }
    }
    void this.recover(entry);
  }

  private recover(entry: Entry): Promise<void> {
    return restore(entry, {
      stopped: () => this.closing !== undefined,
      repair: async () => {
        // Gone when auto-deleted (idle during a long outage) or deleted by someone: recreate it.
        if (!(await this.admin.subscriptionExists(entry.topic, entry.name))) await this.ensure(entry);
      },
      retrying: (err, attempt) => {
        this.noteFailure(err);
        this.log('warn', 'Service Bus subscription not restored yet; retrying', { topic: entry.topic, error: messageOf(err), attempt });
      },
      discard: () => this.admin.deleteSubscription(entry.topic, entry.name).catch(() => {}),
      resume: () => {
        this.listen(entry);
        this.recovered(entry);
      },
    });
  }

  private noteFailure(err: unknown): void {
    if (CONNECTIVITY_CODES.includes(codeOf(err))) this.reachable = false;
  }

  private recovered(entry: Entry): void {
    this.reachable = true;
    if (!entry.failed || entry.closed) return;
    entry.failed = false;
    this.log('info', 'Service Bus subscription restored', { topic: entry.topic, subscription: entry.name });
    for (const listener of entry.listeners) listener.recovered();
  }

  private async stopReceiver(entry: Entry): Promise<void> {
    const { handle, receiver } = entry;
    entry.handle = undefined;
    entry.receiver = undefined;
    await handle?.close().catch(() => {});
    await receiver?.close().catch(() => {});
  }

  private async dispose(entry: Entry): Promise<void> {
    entry.closed = true;
    await this.stopReceiver(entry);
    await this.admin.deleteSubscription(entry.topic, entry.name).catch((err: unknown) => {
      if (!isNotFound(err)) this.log('warn', 'could not delete Service Bus subscription', { subscription: entry.name, error: messageOf(err) });
    });
  }

  private check(topic: string): void {
    if (this.closing !== undefined) throw new RelayError('broker-unavailable', 'the broker is closed', { topic });
    const problem = serviceBusTopicProblem(topic);
    if (problem !== undefined) throw new RelayError('invalid-topic', `invalid topic ${JSON.stringify(topic)}: ${problem}`, { topic });
  }
}

export const open: BrokerOpener = async (url, options) => {
  const parsed = parseAzureSbUrl(url);
  const auth = await resolveAuth(parsed, process.env, () => importPeer<IdentityModule>('@azure/identity', 'azuresb'));
  const sb = await importPeer<ServiceBusModule>('@azure/service-bus', 'azuresb');
  let sdk: { client: SbClient; admin: SbAdmin };
  if ('connectionString' in auth) {
    sdk = { client: new sb.ServiceBusClient(auth.connectionString), admin: new sb.ServiceBusAdministrationClient(auth.connectionString) };
  } else {
    // A TokenCredential from @azure/identity (typed loosely there, as that package is optional).
    const credential = auth.credential as ConstructorParameters<ServiceBusModule['ServiceBusAdministrationClient']>[1];
    sdk = { client: new sb.ServiceBusClient(auth.host, credential), admin: new sb.ServiceBusAdministrationClient(auth.host, credential) };
  }
  const broker = new AzureSbBroker(sdk, parsed.createTopics, options.log);
  await broker.start();
  return broker;
};
