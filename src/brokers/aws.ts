import { randomBytes, randomUUID } from 'node:crypto';
import type { SNSClient } from '@aws-sdk/client-sns';
import type { Message as SqsMessage, MessageAttributeValue, SQSClient } from '@aws-sdk/client-sqs';
import { RelayError } from '../errors.ts';
import { backoff, importPeer } from './broker.ts';
import type { Broker, BrokerOpener, BrokerOptions, BrokerSubscription, SubscriptionListener } from './broker.ts';
import { TopicEntries } from './topic-entries.ts';
import type { TopicEntry } from './topic-entries.ts';

/**
 * Amazon SNS and SQS. Region, credentials and endpoint come from the AWS SDK's standard
 * sources (environment, shared config files, instance roles); `?region=` and `?endpoint=`
 * override them (e.g. `?endpoint=http://127.0.0.1:4566&region=us-east-1` for an emulator).
 *
 * `awssns://` — topics are SNS topics in that account and region (created on first use; SNS
 * names: 1 to 256 of A-Z a-z 0-9 _ -, with a `.fifo` suffix for FIFO topics; other topics are
 * rejected, never rewritten). Each driver instance (relay process) creates ONE SQS queue,
 * `livepipe-<random>`, subscribes it to each SNS topic it needs and reads it with long
 * polling; close() unsubscribes and deletes the queue. The queue policy lets SNS topics of the
 * same account and region send to it. A relay that dies without close() leaves its queue and
 * subscriptions behind (AWS has no expiry for either); the queue keeps messages only 60 s.
 * Raw message delivery stays OFF: with one queue for many topics, the SNS envelope's
 * TopicArn is the only way to tell which topic a message came from (raw delivery drops it).
 *
 * `awssqs://<queue-name>` or `awssqs://<host>/<account>/<queue-name>` (a queue URL without
 * `https:`) — consumes ONE existing queue directly. The topic of a message is its `topic`
 * message attribute (the queue's name when it has none); publish() sends with that
 * attribute. SQS hands each message to ONE consumer: run a single relay process per queue
 * (several would split the messages between them). Messages for topics nobody is
 * subscribed to are consumed and dropped; the queue is read only while a topic is subscribed.
 *
 * Bodies: SNS and SQS carry text of a restricted Unicode set. A body that is valid UTF-8 of
 * that set goes as is; any other (binary) body goes base64-encoded with the message attribute
 * `livepipe-encoding` = `base64`, which the receiving side decodes. Other publishers of binary
 * data do the same. Messages are at most 256 KiB of text (binary: about 192 KiB); an empty
 * body cannot be sent. Delivery is at-least-once (a message whose deletion failed comes back)
 * and in the order SQS returns it (standard queues: best effort).
 */

type SnsModule = typeof import('@aws-sdk/client-sns');
type SqsModule = typeof import('@aws-sdk/client-sqs');

export const ENCODING_ATTRIBUTE = 'livepipe-encoding';
export const TOPIC_ATTRIBUTE = 'topic';
// SNS's limit for a message with its attributes (SQS's was the same for years).
const MAX_MESSAGE_BYTES = 256 * 1024;
const WAIT_SECONDS = 20; // the longest long poll SQS allows
const RETENTION_SECONDS = 60; // the shortest SQS allows: a crashed relay's queue holds little
// Characters SQS and SNS accept in bodies and attribute values (their documented XML set).
const NOT_SENDABLE = /[^\t\n\r\u0020-\uD7FF\uE000-\uFFFD\u{10000}-\u{10FFFF}]/u;
const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Why `topic` is not a valid SNS topic name, or undefined. */
export function snsTopicProblem(topic: string): string | undefined {
  const base = topic.endsWith('.fifo') ? topic.slice(0, -'.fifo'.length) : topic;
  if (topic.length > 256) return `an SNS topic name is at most 256 characters (this one is ${topic.length})`;
  if (!/^[A-Za-z0-9_-]+$/.test(base)) return 'an SNS topic name holds only A-Z a-z 0-9 _ - (and may end in .fifo for a FIFO topic)';
  return undefined;
}

/** The text to send for `body`, base64 when it is not sendable text. */
export function encodeBody(body: Uint8Array): { text: string; base64: boolean } {
  if (body.byteLength === 0) throw new RelayError('bad-request', 'SNS and SQS cannot carry an empty message');
  let text: string | undefined;
  try {
    text = utf8.decode(body);
  } catch {
    // not UTF-8
  }
  if (text !== undefined && !NOT_SENDABLE.test(text)) return { text, base64: false };
  return { text: Buffer.from(body.buffer, body.byteOffset, body.byteLength).toString('base64'), base64: true };
}

function decodeBody(text: string, encoding: string | undefined): Buffer {
  return encoding === 'base64' ? Buffer.from(text, 'base64') : Buffer.from(text, 'utf8');
}

/** The message attributes for an encoded body (plus any extra), checked against the size limit. */
function attributesFor(encoded: { text: string; base64: boolean }, extra: Record<string, string>, topic: string): Record<string, MessageAttributeValue> {
  const attributes: Record<string, MessageAttributeValue> = {};
  let size = Buffer.byteLength(encoded.text);
  const all = encoded.base64 ? { ...extra, [ENCODING_ATTRIBUTE]: 'base64' } : extra;
  for (const [name, value] of Object.entries(all)) {
    attributes[name] = { DataType: 'String', StringValue: value };
    size += Buffer.byteLength(name) + 'String'.length + Buffer.byteLength(value);
  }
  if (size > MAX_MESSAGE_BYTES) {
    throw new RelayError('too-large', `an SNS/SQS message is at most ${MAX_MESSAGE_BYTES} bytes with its attributes (this one is ${size}${encoded.base64 ? ', base64-encoded' : ''})`, { topic });
  }
  return attributes;
}

interface AwsUrl {
  region: string | undefined;
  endpoint: string | undefined;
}

/** Parses `?region=&endpoint=`; `queue` is the awssqs:// queue name or URL. */
export function parseAwsUrl(url: URL): AwsUrl & { queue: string } {
  const scheme = url.protocol.replace(/:$/, '');
  let region: string | undefined;
  let endpoint: string | undefined;
  for (const [key, value] of url.searchParams) {
    if (key === 'region' && /^[a-z0-9-]+$/.test(value)) region = value;
    else if (key === 'endpoint' && /^https?:\/\/[^/]+\/?$/.test(value)) endpoint = value.replace(/\/$/, '');
    else if (key === 'region' || key === 'endpoint') {
      throw new RelayError('bad-request', `${scheme}:// option ${key}=${JSON.stringify(value)} is not ${key === 'region' ? 'a region name' : 'an http(s)://host[:port] URL'}`);
    } else throw new RelayError('bad-request', `unknown ${scheme}:// option ${JSON.stringify(key)} (known: region, endpoint)`);
  }
  const host = decodeURIComponent(url.host);
  const path = url.pathname.replace(/^\/$/, '');
  if (scheme === 'awssns') {
    if (host !== '' || path !== '') throw new RelayError('bad-request', `awssns:// takes no host or path (topics name the SNS topics); got ${JSON.stringify(url.href)}`);
    return { region, endpoint, queue: '' };
  }
  if (host === '') throw new RelayError('bad-request', 'awssqs:// needs a queue name or URL, e.g. awssqs://my-queue');
  // A path makes it a queue URL; with ?endpoint= (an emulator) the URL lives there.
  return { region, endpoint, queue: path === '' ? host : `${endpoint ?? `https://${host}`}${path}` };
}

const nameOf = (err: unknown): string => String((err as { name?: unknown }).name ?? '');
const messageOf = (err: unknown): string => (err instanceof Error ? err.message : String(err));
const isMissingQueue = (err: unknown): boolean => nameOf(err) === 'QueueDoesNotExist' || /NonExistentQueue/.test(String((err as { Code?: unknown }).Code));

/**
 * Long-polls one queue until stopped: hands each batch to `deliver`, deletes it, and reports
 * failures (`fail`, once per outage) and recovery (`ok`). `repair` runs after a failure that
 * says the queue is gone.
 */
class QueueReader {
  private running: Promise<void> | undefined;
  private abort: AbortController | undefined;
  failed = false;
  private readonly sqs: SQSClient;
  private readonly sqsModule: SqsModule;
  private readonly hooks: {
    queueUrl(): string;
    deliver(message: SqsMessage): void;
    fail(err: unknown): void;
    ok(): void;
    repair?(): Promise<void>;
    log: NonNullable<BrokerOptions['log']>;
  };

  constructor(sqs: SQSClient, sqsModule: SqsModule, hooks: QueueReader['hooks']) {
    this.sqs = sqs;
    this.sqsModule = sqsModule;
    this.hooks = hooks;
  }

  start(): void {
    if (this.running !== undefined) return;
    const abort = (this.abort = new AbortController());
    this.running = this.loop(abort.signal).finally(() => {
      if (this.abort === abort) this.running = undefined;
    });
  }

  async stop(): Promise<void> {
    const running = this.running;
    this.abort?.abort();
    this.abort = undefined;
    this.running = undefined;
    await running;
  }

  private async loop(signal: AbortSignal): Promise<void> {
    const { ReceiveMessageCommand, DeleteMessageBatchCommand } = this.sqsModule;
    for (let attempt = 0; !signal.aborted; ) {
      try {
        // After a failure, a short poll: it proves the queue readable again without waiting 20 s.
        const wait = this.failed ? 0 : WAIT_SECONDS;
        const out = await this.sqs.send(new ReceiveMessageCommand({ QueueUrl: this.hooks.queueUrl(), MaxNumberOfMessages: 10, WaitTimeSeconds: wait, MessageAttributeNames: ['All'] }), { abortSignal: signal });
        if (signal.aborted) return;
        attempt = 0;
        if (this.failed) {
          this.failed = false;
          this.hooks.ok();
        }
        const messages = out.Messages ?? [];
        for (const message of messages) this.hooks.deliver(message);
        if (messages.length === 0) continue;
        const entries = messages.map((m, i) => ({ Id: String(i), ReceiptHandle: m.ReceiptHandle! }));
        await this.sqs.send(new DeleteMessageBatchCommand({ QueueUrl: this.hooks.queueUrl(), Entries: entries })).catch((err: unknown) => {
          this.hooks.log('warn', 'could not delete received SQS messages; they will come again', { error: messageOf(err) });
        });
      } catch (err) {
        if (signal.aborted) return;
        if (!this.failed) {
          this.failed = true;
          this.hooks.fail(err);
        }
        attempt++;
        if (isMissingQueue(err) && this.hooks.repair) {
          try {
            await this.hooks.repair();
            attempt = 0;
            continue; // read the new queue right away
          } catch (again) {
            this.hooks.log('warn', 'could not recreate the SQS queue yet', { error: messageOf(again), attempt });
          }
        }
        await backoff(attempt);
      }
    }
  }
}

function topicFailure(scheme: string, what: string, err: unknown, topic: string): RelayError {
  return new RelayError('subscription-failure', `${scheme}: ${what}: ${messageOf(err)}`, { topic, cause: err });
}

interface SnsEntry extends TopicEntry {
  topicArn: string;
  subscriptionArn: string;
}

export class AwsSnsBroker implements Broker {
  readonly scheme = 'awssns';
  /** This instance's queue (renamed if it has to be recreated); for diagnostics and tests. */
  queueName = '';
  queueUrl = '';
  queueArn = '';
  private readonly entries = new TopicEntries<SnsEntry>();
  private readonly topicArns = new Map<string, Promise<string>>();
  private readonly reader: QueueReader;
  private closing: Promise<void> | undefined;
  private readonly sns: SNSClient;
  private readonly snsModule: SnsModule;
  private readonly sqs: SQSClient;
  private readonly sqsModule: SqsModule;
  private readonly log: NonNullable<BrokerOptions['log']>;

  constructor(clients: { sns: SNSClient; snsModule: SnsModule; sqs: SQSClient; sqsModule: SqsModule }, log: BrokerOptions['log'] = () => {}) {
    this.sns = clients.sns;
    this.snsModule = clients.snsModule;
    this.sqs = clients.sqs;
    this.sqsModule = clients.sqsModule;
    this.log = log;
    this.reader = new QueueReader(this.sqs, this.sqsModule, {
      queueUrl: () => this.queueUrl,
      deliver: (m) => this.deliver(m),
      fail: (err) => this.lost(err),
      ok: () => this.restored(),
      repair: () => this.rebuild(),
      log: this.log,
    });
  }

  /** Creates the queue and starts reading it; rejects with broker-unavailable. */
  async start(): Promise<void> {
    try {
      await this.createQueue();
    } catch (err) {
      this.sns.destroy();
      this.sqs.destroy();
      throw new RelayError('broker-unavailable', `cannot create the SQS queue for awssns://: ${messageOf(err)}`, { cause: err });
    }
    this.reader.start();
  }

  topicProblem(topic: string): string | undefined {
    return snsTopicProblem(topic);
  }

  async subscribe(topic: string, listener: SubscriptionListener): Promise<BrokerSubscription> {
    this.check(topic);
    return this.entries.join(topic, listener, {
      create: () => ({ listeners: new Set(), ready: Promise.resolve(), topicArn: '', subscriptionArn: '' }),
      start: (entry) => this.attach(topic, entry),
      failure: (err) => topicFailure('awssns', `cannot subscribe to SNS topic ${JSON.stringify(topic)}`, err, topic),
      dispose: (entry) => this.detach(entry),
    });
  }

  async publish(topic: string, body: Uint8Array): Promise<void> {
    this.check(topic);
    const encoded = encodeBody(body);
    const attributes = attributesFor(encoded, {}, topic);
    try {
      const fifo = topic.endsWith('.fifo');
      await this.sns.send(new this.snsModule.PublishCommand({
        TopicArn: await this.topicArn(topic),
        Message: encoded.text,
        MessageAttributes: encoded.base64 ? attributes : undefined,
        // FIFO topics need a group id (one for everything keeps the topic in order) and a dedup id.
        ...(fifo ? { MessageGroupId: 'livepipe', MessageDeduplicationId: randomUUID() } : {}),
      }));
    } catch (err) {
      throw new RelayError('broker-unavailable', `SNS did not accept the message: ${messageOf(err)}`, { topic, cause: err });
    }
  }

  isConnected(): boolean {
    return this.closing === undefined && !this.reader.failed;
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      await this.reader.stop();
      await this.entries.disposeAll((entry) => this.detach(entry));
      await this.sqs.send(new this.sqsModule.DeleteQueueCommand({ QueueUrl: this.queueUrl })).catch((err: unknown) => {
        this.log('warn', 'could not delete the SQS queue', { queue: this.queueUrl, error: messageOf(err) });
      });
      this.sns.destroy();
      this.sqs.destroy();
    })();
    return this.closing;
  }

  /** The topic's ARN; CreateTopic is idempotent and creates a missing topic. */
  private topicArn(topic: string): Promise<string> {
    let arn = this.topicArns.get(topic);
    if (arn === undefined) {
      const attributes = topic.endsWith('.fifo') ? { FifoTopic: 'true' } : undefined;
      arn = this.sns.send(new this.snsModule.CreateTopicCommand({ Name: topic, Attributes: attributes })).then((out) => out.TopicArn!);
      this.topicArns.set(topic, arn);
      arn.catch(() => this.topicArns.delete(topic));
    }
    return arn;
  }

  private async attach(topic: string, entry: SnsEntry): Promise<void> {
    entry.topicArn = await this.topicArn(topic);
    const out = await this.sns.send(new this.snsModule.SubscribeCommand({ TopicArn: entry.topicArn, Protocol: 'sqs', Endpoint: this.queueArn, ReturnSubscriptionArn: true }));
    entry.subscriptionArn = out.SubscriptionArn!;
  }

  private async detach(entry: SnsEntry): Promise<void> {
    if (entry.subscriptionArn === '') return;
    await this.sns.send(new this.snsModule.UnsubscribeCommand({ SubscriptionArn: entry.subscriptionArn })).catch((err: unknown) => {
      this.log('warn', 'could not remove an SNS subscription', { subscription: entry.subscriptionArn, error: messageOf(err) });
    });
  }

  private async createQueue(): Promise<void> {
    const { CreateQueueCommand, GetQueueAttributesCommand, SetQueueAttributesCommand } = this.sqsModule;
    const name = `livepipe-${randomBytes(8).toString('hex')}`;
    const { QueueUrl } = await this.sqs.send(new CreateQueueCommand({ QueueName: name, Attributes: { MessageRetentionPeriod: String(RETENTION_SECONDS) } }));
    const attrs = await this.sqs.send(new GetQueueAttributesCommand({ QueueUrl, AttributeNames: ['QueueArn'] }));
    const arn = attrs.Attributes!.QueueArn!;
    // arn:<partition>:sqs:<region>:<account>:<name>: let SNS topics of the same account and region send.
    const [, partition, , region, account] = arn.split(':');
    const policy = {
      Version: '2012-10-17',
      Statement: [{
        Sid: 'livepipe-sns',
        Effect: 'Allow',
        Principal: { Service: 'sns.amazonaws.com' },
        Action: 'sqs:SendMessage',
        Resource: arn,
        Condition: { ArnLike: { 'aws:SourceArn': `arn:${partition}:sns:${region}:${account}:*` } },
      }],
    };
    await this.sqs.send(new SetQueueAttributesCommand({ QueueUrl, Attributes: { Policy: JSON.stringify(policy) } }));
    this.queueName = name;
    this.queueUrl = QueueUrl!;
    this.queueArn = arn;
  }

  /** The queue is gone (deleted, or an emulator restarted): a new queue, every topic subscribed again. */
  private async rebuild(): Promise<void> {
    if (this.closing !== undefined) return;
    await this.createQueue();
    this.topicArns.clear(); // topics may be gone too (an emulator restart)
    for (const [topic, entry] of this.entries) {
      await entry.ready.catch(() => {});
      const old = entry.subscriptionArn;
      await this.attach(topic, entry);
      if (old !== '') await this.sns.send(new this.snsModule.UnsubscribeCommand({ SubscriptionArn: old })).catch(() => {});
    }
    this.log('info', 'recreated the SQS queue of awssns://', { queue: this.queueName, topics: this.entries.size });
  }

  private deliver(message: SqsMessage): void {
    let envelope: { Type?: string; TopicArn?: string; Message?: string; MessageAttributes?: Record<string, { Value?: string }> };
    try {
      envelope = JSON.parse(message.Body ?? '');
    } catch {
      this.log('warn', 'dropped an SQS message that is not an SNS notification', { queue: this.queueName });
      return;
    }
    if (envelope.Type !== 'Notification' || envelope.TopicArn === undefined || envelope.Message === undefined) return;
    const topic = envelope.TopicArn.slice(envelope.TopicArn.lastIndexOf(':') + 1);
    const entry = this.entries.get(topic);
    if (entry === undefined || entry.topicArn !== envelope.TopicArn) return; // unsubscribed meanwhile
    const body = decodeBody(envelope.Message, envelope.MessageAttributes?.[ENCODING_ATTRIBUTE]?.Value);
    for (const listener of entry.listeners) listener.message(body);
  }

  private lost(err: unknown): void {
    if (this.closing !== undefined) return;
    this.log('warn', 'lost the SQS queue of awssns://; retrying', { queue: this.queueName, error: messageOf(err) });
    this.entries.failAll((topic) => topicFailure('awssns', 'lost the SQS queue; retrying', err, topic));
  }

  private restored(): void {
    this.log('info', 'awssns:// delivery restored', { queue: this.queueName });
    this.entries.recoverAll();
  }

  private check(topic: string): void {
    if (this.closing !== undefined) throw new RelayError('broker-unavailable', 'the broker is closed', { topic });
    const problem = snsTopicProblem(topic);
    if (problem !== undefined) throw new RelayError('invalid-topic', `invalid topic ${JSON.stringify(topic)}: ${problem}`, { topic });
  }
}

export class AwsSqsBroker implements Broker {
  readonly scheme = 'awssqs';
  readonly competingReaders = true;
  readonly queueUrl: string;
  /** Messages without a `topic` attribute belong to this topic: the queue's name. */
  readonly defaultTopic: string;
  private readonly topics = new Map<string, Set<SubscriptionListener>>();
  private readonly reader: QueueReader;
  private closing: Promise<void> | undefined;
  private readonly sqs: SQSClient;
  private readonly sqsModule: SqsModule;
  private readonly log: NonNullable<BrokerOptions['log']>;

  constructor(sqs: SQSClient, sqsModule: SqsModule, queueUrl: string, log: BrokerOptions['log'] = () => {}) {
    this.sqs = sqs;
    this.sqsModule = sqsModule;
    this.queueUrl = queueUrl;
    this.defaultTopic = decodeURIComponent(queueUrl.slice(queueUrl.lastIndexOf('/') + 1));
    this.log = log;
    this.reader = new QueueReader(sqs, sqsModule, {
      queueUrl: () => this.queueUrl,
      deliver: (m) => this.deliver(m),
      fail: (err) => this.report((topic) => topicFailure('awssqs', 'cannot read the SQS queue; retrying', err, topic)),
      ok: () => this.report(),
      log: this.log,
    });
  }

  topicProblem(): string | undefined {
    return undefined; // a topic travels in a message attribute, which holds any topic
  }

  async subscribe(topic: string, listener: SubscriptionListener): Promise<BrokerSubscription> {
    this.check(topic);
    let listeners = this.topics.get(topic);
    if (listeners === undefined) this.topics.set(topic, (listeners = new Set()));
    listeners.add(listener);
    this.reader.start();
    let open = true;
    return {
      close: async () => {
        if (!open) return;
        open = false;
        listeners.delete(listener);
        if (listeners.size === 0 && this.topics.get(topic) === listeners) this.topics.delete(topic);
        // Stop consuming when nobody listens, so the queue keeps what arrives meanwhile.
        if (this.topics.size === 0) await this.reader.stop();
      },
    };
  }

  async publish(topic: string, body: Uint8Array): Promise<void> {
    this.check(topic);
    const encoded = encodeBody(body);
    const attributes = attributesFor(encoded, { [TOPIC_ATTRIBUTE]: topic }, topic);
    const fifo = this.queueUrl.endsWith('.fifo');
    try {
      await this.sqs.send(new this.sqsModule.SendMessageCommand({
        QueueUrl: this.queueUrl,
        MessageBody: encoded.text,
        MessageAttributes: attributes,
        ...(fifo ? { MessageGroupId: 'livepipe', MessageDeduplicationId: randomUUID() } : {}),
      }));
    } catch (err) {
      throw new RelayError('broker-unavailable', `SQS did not accept the message: ${messageOf(err)}`, { topic, cause: err });
    }
  }

  isConnected(): boolean {
    return this.closing === undefined && !this.reader.failed;
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      this.topics.clear();
      await this.reader.stop();
      this.sqs.destroy();
    })();
    return this.closing;
  }

  private deliver(message: SqsMessage): void {
    const attributes = message.MessageAttributes ?? {};
    const topic = attributes[TOPIC_ATTRIBUTE]?.StringValue ?? this.defaultTopic;
    const listeners = this.topics.get(topic);
    if (listeners === undefined) return;
    const body = decodeBody(message.Body ?? '', attributes[ENCODING_ATTRIBUTE]?.StringValue);
    for (const listener of listeners) listener.message(body);
  }

  /** Tells every listener: an error (when `error` is given) or recovery. */
  private report(error?: (topic: string) => RelayError): void {
    if (this.closing !== undefined) return;
    this.log(error ? 'warn' : 'info', error ? 'cannot read the SQS queue; retrying' : 'SQS delivery restored', { queue: this.queueUrl });
    for (const [topic, listeners] of this.topics) {
      for (const listener of listeners) {
        if (error) listener.error(error(topic));
        else listener.recovered();
      }
    }
  }

  private check(topic: string): void {
    if (this.closing !== undefined) throw new RelayError('broker-unavailable', 'the broker is closed', { topic });
  }
}

function clientConfig({ region, endpoint }: AwsUrl): { region?: string; endpoint?: string } {
  return { ...(region ? { region } : {}), ...(endpoint ? { endpoint } : {}) };
}

export const openSns: BrokerOpener = async (url, options) => {
  const parsed = parseAwsUrl(url);
  const snsModule = await importPeer<SnsModule>('@aws-sdk/client-sns', 'awssns');
  const sqsModule = await importPeer<SqsModule>('@aws-sdk/client-sqs', 'awssns');
  const sns = new snsModule.SNSClient(clientConfig(parsed));
  const sqs = new sqsModule.SQSClient(clientConfig(parsed));
  const broker = new AwsSnsBroker({ sns, snsModule, sqs, sqsModule }, options.log);
  await broker.start();
  return broker;
};

export const openSqs: BrokerOpener = async (url, options) => {
  const parsed = parseAwsUrl(url);
  const sqsModule = await importPeer<SqsModule>('@aws-sdk/client-sqs', 'awssqs');
  const sqs = new sqsModule.SQSClient(clientConfig(parsed));
  let queueUrl = parsed.queue;
  try {
    if (!/^https?:\/\//.test(queueUrl)) {
      queueUrl = (await sqs.send(new sqsModule.GetQueueUrlCommand({ QueueName: queueUrl }))).QueueUrl!;
    } else {
      await sqs.send(new sqsModule.GetQueueAttributesCommand({ QueueUrl: queueUrl, AttributeNames: ['QueueArn'] }));
    }
  } catch (err) {
    sqs.destroy();
    const why = isMissingQueue(err) ? `the queue ${JSON.stringify(parsed.queue)} does not exist` : messageOf(err);
    throw new RelayError('broker-unavailable', `cannot open the SQS queue for awssqs://: ${why}`, { cause: err });
  }
  return new AwsSqsBroker(sqs, sqsModule, queueUrl, options.log);
};
