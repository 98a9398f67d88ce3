/**
 * azuresb:// tested at the SDK boundary: no Service Bus emulator runs here (it needs Docker),
 * so these tests drive AzureSbBroker through fakes of the @azure/service-bus client objects it
 * uses (the SbClient / SbAdmin seam) and check what it asks of them and how it reacts. What
 * only a live namespace can show (AMQP links, auto-delete timing, SAS/Entra auth, the SDK's own
 * retries) is not verified here.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { Collector, rejectsWith } from './conformance.ts';
import { openBroker } from '../../src/brokers/index.ts';
import {
  AzureSbBroker,
  AUTO_DELETE_ON_IDLE,
  bodyBytes,
  connectionStringHost,
  describeServiceBusError,
  parseAzureSbUrl,
  resolveAuth,
} from '../../src/brokers/azuresb.ts';
import type { SbAdmin, SbClient, SbHandlers, SbMessage, SbReceiver, SbSender } from '../../src/brokers/azuresb.ts';
import { RelayError } from '../../src/errors.ts';

/** An SDK error as @azure/service-bus shapes them: a code (ServiceBusError) or a statusCode (RestError). */
function sdkError(code: string, statusCode?: number): Error {
  return Object.assign(new Error(`fake ${code}`), { code, statusCode });
}

class FakeReceiver implements SbReceiver {
  handlers: SbHandlers | undefined;
  options: unknown;
  completed: SbMessage[] = [];
  closed = false;
  subscriptionClosed = false;
  completeFails: Error | undefined;
  readonly topic: string;
  readonly subscription: string;
  readonly createOptions: unknown;
  constructor(topic: string, subscription: string, createOptions: unknown) {
    this.topic = topic;
    this.subscription = subscription;
    this.createOptions = createOptions;
  }
  subscribe(handlers: SbHandlers, options: unknown) {
    this.handlers = handlers;
    this.options = options;
    return { close: async () => void (this.subscriptionClosed = true) };
  }
  async completeMessage(message: SbMessage) {
    if (this.completeFails) throw this.completeFails;
    this.completed.push(message);
  }
  async close() {
    this.closed = true;
  }
  /** What the SDK does on a message: hand it over and wait for the handler. */
  deliver(body: unknown): Promise<void> {
    return this.handlers!.processMessage({ body });
  }
  error(error: Error, errorSource = 'receive'): Promise<void> {
    return this.handlers!.processError({ error, errorSource });
  }
}

class FakeSender implements SbSender {
  sent: Uint8Array[] = [];
  failures: Error[] = [];
  closed = false;
  async sendMessages(message: { body: Uint8Array }) {
    const failure = this.failures.shift();
    if (failure) throw failure;
    this.sent.push(message.body);
  }
  async close() {
    this.closed = true;
  }
}

class FakeServiceBus {
  topics = new Set<string>();
  /** topic → subscription name → options */
  subscriptions = new Map<string, Map<string, unknown>>();
  receivers: FakeReceiver[] = [];
  senders = new Map<string, FakeSender>();
  calls: string[] = [];
  clientClosed = false;
  /** Next failure per admin method. */
  fail: Partial<Record<keyof SbAdmin, Error>> = {};

  private take(method: keyof SbAdmin): void {
    const error = this.fail[method];
    if (error) {
      delete this.fail[method];
      throw error;
    }
  }

  readonly admin: SbAdmin = {
    getNamespaceProperties: async () => this.take('getNamespaceProperties'),
    topicExists: async (topic) => {
      this.take('topicExists');
      return this.topics.has(topic);
    },
    createTopic: async (topic) => {
      this.take('createTopic');
      this.calls.push(`createTopic ${topic}`);
      if (this.topics.has(topic)) throw sdkError('MessageEntityAlreadyExistsError', 409);
      this.topics.add(topic);
    },
    subscriptionExists: async (topic, name) => {
      this.take('subscriptionExists');
      return this.subscriptions.get(topic)?.has(name) ?? false;
    },
    createSubscription: async (topic, name, options) => {
      this.take('createSubscription');
      this.calls.push(`createSubscription ${topic} ${name}`);
      if (!this.topics.has(topic)) throw sdkError('MessageEntityNotFoundError', 404);
      let subs = this.subscriptions.get(topic);
      if (subs === undefined) this.subscriptions.set(topic, (subs = new Map()));
      if (subs.has(name)) throw sdkError('MessageEntityAlreadyExistsError', 409);
      subs.set(name, options);
    },
    deleteSubscription: async (topic, name) => {
      this.take('deleteSubscription');
      this.calls.push(`deleteSubscription ${topic} ${name}`);
      if (!this.subscriptions.get(topic)?.delete(name)) throw sdkError('MessageEntityNotFoundError', 404);
    },
  };

  readonly client: SbClient = {
    createReceiver: (topic, subscription, options) => {
      const r = new FakeReceiver(topic, subscription, options);
      this.receivers.push(r);
      return r;
    },
    createSender: (topic) => {
      let s = this.senders.get(topic);
      if (s === undefined) this.senders.set(topic, (s = new FakeSender()));
      return s;
    },
    close: async () => void (this.clientClosed = true),
  };

  names(topic: string): string[] {
    return [...(this.subscriptions.get(topic)?.keys() ?? [])];
  }
  receiverFor(topic: string): FakeReceiver {
    const open = this.receivers.filter((r) => r.topic === topic && !r.closed);
    assert.equal(open.length, 1, `one open receiver on ${topic}`);
    return open[0]!;
  }
}

async function fakeBroker(createTopics = true) {
  const sb = new FakeServiceBus();
  const broker = new AzureSbBroker(sb, createTopics);
  await broker.start();
  return { sb, broker };
}

const until = async (predicate: () => boolean, what: string) => {
  for (let i = 0; i < 200 && !predicate(); i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(predicate(), what);
};

describe('azuresb driver at the SDK boundary (fake @azure/service-bus clients, no live namespace)', () => {
  it('enforces the topic name rules, naming each', async () => {
    const { broker } = await fakeBroker();
    assert.match(broker.topicProblem('x'.repeat(261)) ?? '', /at most 260 characters \(this one is 261\)/);
    assert.match(broker.topicProblem('Chat') ?? '', /ignore case, so topics must be lower case/);
    assert.match(broker.topicProblem('a b') ?? '', /only a-z 0-9 \. - _ \//);
    assert.match(broker.topicProblem('ünï') ?? '', /only a-z 0-9/);
    assert.match(broker.topicProblem('/orders') ?? '', /starts and ends with a letter or digit/);
    assert.match(broker.topicProblem('orders-') ?? '', /starts and ends with a letter or digit/);
    for (const topic of ['chat', 'orders.created', 'user-42', 'a_b', 'shop/orders/created', 'x'.repeat(260), '7']) {
      assert.equal(broker.topicProblem(topic), undefined, topic);
    }
    await assert.rejects(broker.subscribe('Chat', new Collector()), rejectsWith('invalid-topic', /"Chat".*lower case/));
    await assert.rejects(broker.publish('a b', Buffer.from('x')), rejectsWith('invalid-topic', /only a-z/));
    await broker.close();
  });

  it('creates a missing topic and one auto-deleting subscription per topic, read in peek-lock mode with raw bodies', async () => {
    const { sb, broker } = await fakeBroker();
    const one = new Collector();
    const two = new Collector();
    await broker.subscribe('orders', one);
    await broker.subscribe('orders', two);
    assert.deepEqual([...sb.topics], ['orders']);
    const names = sb.names('orders');
    assert.equal(names.length, 1, 'one subscription shared by both listeners');
    const name = names[0]!;
    assert.match(name, new RegExp(`^livepipe-${broker.instanceId}-\\d+$`));
    assert.ok(name.length <= 50, 'Service Bus subscription names are at most 50 characters');
    assert.deepEqual(sb.subscriptions.get('orders')!.get(name), { autoDeleteOnIdle: AUTO_DELETE_ON_IDLE });
    assert.equal(AUTO_DELETE_ON_IDLE, 'PT5M');
    const receiver = sb.receiverFor('orders');
    assert.equal(receiver.subscription, name);
    assert.deepEqual(receiver.createOptions, { receiveMode: 'peekLock', skipParsingBodyAsJson: true });
    assert.deepEqual(receiver.options, { autoCompleteMessages: false, maxConcurrentCalls: 1 });
    await broker.close();
  });

  it('completes each message only after every listener has it, and converts bodies to bytes', async () => {
    const { sb, broker } = await fakeBroker();
    const seenAtCompletion: number[] = [];
    const c = new Collector();
    await broker.subscribe('t', c);
    const receiver = sb.receiverFor('t');
    const complete = receiver.completeMessage.bind(receiver);
    receiver.completeMessage = async (m) => {
      seenAtCompletion.push(c.bodies.length);
      await complete(m);
    };
    await receiver.deliver(Buffer.from([0, 0xff, 0x80]));
    await receiver.deliver(new Uint8Array([1, 2]));
    await receiver.deliver('text body é'); // an AMQP value section holding a string
    await receiver.deliver({ a: [1, 2] }); // any other AMQP value
    assert.deepEqual(c.bodies, [Buffer.from([0, 0xff, 0x80]), Buffer.from([1, 2]), Buffer.from('text body é'), Buffer.from('{"a":[1,2]}')]);
    assert.deepEqual(seenAtCompletion, [1, 2, 3, 4]);
    assert.equal(receiver.completed.length, 4);
    assert.deepEqual(bodyBytes(null), Buffer.from('null'));
    await broker.close();
  });

  it('reports a broken receive link once as subscription-failure, then restores a fresh receiver', async () => {
    const { sb, broker } = await fakeBroker();
    const c = new Collector();
    await broker.subscribe('t', c);
    const first = sb.receiverFor('t');
    sb.fail.subscriptionExists = sdkError('ServiceCommunicationProblem'); // still unreachable at the first check
    await first.error(sdkError('ServiceCommunicationProblem'));
    await first.error(sdkError('ServiceCommunicationProblem')); // the SDK reports every retry: one report is enough
    assert.equal(c.errors.length, 1);
    assert.equal(c.errors[0]!.code, 'subscription-failure');
    assert.equal(c.errors[0]!.topic, 't');
    assert.match(c.errors[0]!.message, /cannot reach the Service Bus namespace/);
    assert.equal(broker.isConnected(), false);
    await until(() => c.recoveries === 1, 'recovery');
    assert.equal(first.closed, true);
    assert.equal(first.subscriptionClosed, true);
    const second = sb.receiverFor('t');
    assert.notEqual(second, first);
    assert.equal(second.subscription, first.subscription, 'the same subscription, still there');
    assert.equal(broker.isConnected(), true);
    await second.deliver(Buffer.from('after'));
    assert.deepEqual(c.texts(), ['after']);
    // A message from the replaced receiver is ignored (not completed: it comes again).
    await first.deliver(Buffer.from('stale'));
    assert.deepEqual(c.texts(), ['after']);
    assert.equal(first.completed.length, 0);
    await broker.close();
  });

  it('recreates a subscription that disappeared (auto-deleted or deleted), under the same name', async () => {
    const { sb, broker } = await fakeBroker();
    const c = new Collector();
    await broker.subscribe('t', c);
    const [name] = sb.names('t');
    sb.subscriptions.get('t')!.delete(name!);
    sb.fail.subscriptionExists = sdkError('ServiceCommunicationProblem'); // the first check fails: retried
    await sb.receiverFor('t').error(sdkError('MessagingEntityNotFound'));
    assert.match(c.errors[0]!.message, /the topic or subscription does not exist/);
    await until(() => c.recoveries === 1, 'recovery');
    assert.deepEqual(sb.names('t'), [name]);
    assert.equal(sb.calls.filter((x) => x.startsWith('createSubscription')).length, 2);
    assert.equal(broker.isConnected(), true);
    await broker.close();
  });

  it('treats failed settlement as a redelivery, not a broken subscription', async () => {
    const sb = new FakeServiceBus();
    const logs: Array<[string, unknown]> = [];
    const broker = new AzureSbBroker(sb, true, (_level, message, details) => logs.push([message, details?.source]));
    const c = new Collector();
    await broker.subscribe('t', c);
    const receiver = sb.receiverFor('t');
    receiver.completeFails = sdkError('MessageLockLost');
    await receiver.deliver(Buffer.from('x'));
    await receiver.error(sdkError('MessageLockLost'), 'renewLock');
    assert.deepEqual([c.texts(), c.errors.length, broker.isConnected(), sb.receiverFor('t')], [['x'], 0, true, receiver]);
    const settlement = logs.filter(([m]) => /settlement failed/.test(m)).map(([, source]) => source);
    assert.deepEqual(settlement, ['complete', 'renewLock']);
    await broker.close();
  });

  it('maps refusals to RelayError codes: missing topic, no Manage rights, unreachable namespace', async () => {
    const strict = await fakeBroker(false);
    await assert.rejects(strict.broker.subscribe('missing', new Collector()), rejectsWith('subscription-failure', /"missing" does not exist \(and create_topics=false\)/));
    assert.deepEqual(strict.sb.calls, ['createSubscription missing ' + `livepipe-${strict.broker.instanceId}-1`]);
    assert.equal(strict.sb.topics.size, 0, 'no topic created');
    strict.sb.fail.createSubscription = sdkError('UnauthorizedRequestError', 401);
    strict.sb.topics.add('t');
    await assert.rejects(strict.broker.subscribe('t', new Collector()), rejectsWith('subscription-failure', /not authorized \(the relay needs Manage rights/));
    await strict.broker.close();

    const sb = new FakeServiceBus();
    sb.fail.getNamespaceProperties = sdkError('ServiceCommunicationProblem');
    await assert.rejects(new AzureSbBroker(sb, true).start(), rejectsWith('broker-unavailable', /cannot use the Service Bus namespace: cannot reach/));
    assert.equal(sb.clientClosed, true);
    assert.match(describeServiceBusError(sdkError('UnauthorizedAccess')), /Manage rights/);
    assert.match(describeServiceBusError(new Error('plain')), /^plain$/);
  });

  it('publishes bytes as the body, creating a missing topic once, and maps size and other failures', async () => {
    const { sb, broker } = await fakeBroker();
    await broker.publish('news', new Uint8Array([1, 2, 3]));
    const sender = sb.senders.get('news')!;
    assert.deepEqual(sender.sent, [Buffer.from([1, 2, 3])]);
    assert.ok(Buffer.isBuffer(sender.sent[0]), 'a Buffer goes as an AMQP data section');
    sender.failures.push(sdkError('MessagingEntityNotFound'));
    await broker.publish('news', Buffer.from('again'));
    assert.deepEqual(sb.calls, ['createTopic news']);
    assert.equal(sender.sent.length, 2);
    sender.failures.push(sdkError('MessageSizeExceeded'));
    await assert.rejects(broker.publish('news', Buffer.from('big')), rejectsWith('too-large', /larger than this Service Bus namespace accepts/));
    sender.failures.push(sdkError('ServiceCommunicationProblem'));
    await assert.rejects(broker.publish('news', Buffer.from('x')), rejectsWith('broker-unavailable', /did not accept the message: cannot reach/));
    await broker.close();
    assert.equal(sender.closed, true);
  });

  it('deletes its subscriptions and closes receivers, senders and client on close, idempotently', async () => {
    const { sb, broker } = await fakeBroker();
    const keep = await broker.subscribe('a', new Collector());
    const also = await broker.subscribe('a', new Collector());
    await broker.subscribe('b', new Collector());
    await broker.publish('b', Buffer.from('x'));
    await keep.close();
    assert.equal(sb.names('a').length, 1, 'another listener still needs it');
    await also.close();
    await also.close();
    assert.deepEqual(sb.names('a'), []);
    assert.equal(sb.receivers.find((r) => r.topic === 'a')!.closed, true);
    await broker.close();
    await broker.close();
    assert.deepEqual(sb.names('b'), []);
    assert.ok(sb.receivers.every((r) => r.closed && r.subscriptionClosed));
    assert.equal(sb.senders.get('b')!.closed, true);
    assert.equal(sb.clientClosed, true);
    assert.equal(broker.isConnected(), false);
    await assert.rejects(broker.subscribe('c', new Collector()), rejectsWith('broker-unavailable', /closed/));
  });

  it('parses its URL, and finds credentials in the URL, then the environment, then @azure/identity', async () => {
    const parse = (url: string) => parseAzureSbUrl(new URL(url));
    assert.deepEqual(parse('azuresb://my-ns'), { host: 'my-ns.servicebus.windows.net', connectionString: undefined, createTopics: true });
    assert.deepEqual(parse('azuresb://my-ns.servicebus.chinacloudapi.cn?create_topics=false').host, 'my-ns.servicebus.chinacloudapi.cn');
    assert.equal(parse('azuresb://').host, '');
    assert.equal(parse('azuresb://Root%20Key:a%2Fb%3D@my-ns').connectionString, 'Endpoint=sb://my-ns.servicebus.windows.net/;SharedAccessKeyName=Root Key;SharedAccessKey=a/b=');
    assert.throws(() => parse('azuresb://key@my-ns'), rejectsWith('bad-request', /azuresb:\/\/<KeyName>:<Key>@<namespace>/));
    assert.throws(() => parse('azuresb://my-ns/orders'), rejectsWith('bad-request', /no path/));
    assert.throws(() => parse('azuresb://my-ns?create_topics=maybe'), rejectsWith('bad-request', /must be true or false/));
    assert.throws(() => parse('azuresb://my-ns?topic=x'), rejectsWith('bad-request', /unknown azuresb:\/\/ option "topic"/));
    assert.equal(connectionStringHost('Endpoint=sb://Other.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v'), 'other.servicebus.windows.net');

    const noIdentity = async () => {
      throw new RelayError('missing-client', 'no @azure/identity');
    };
    const cs = 'Endpoint=sb://my-ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v';
    assert.deepEqual(await resolveAuth(parse('azuresb://'), { SERVICEBUS_CONNECTION_STRING: cs }, noIdentity), { host: 'my-ns.servicebus.windows.net', connectionString: cs });
    assert.deepEqual(await resolveAuth(parse('azuresb://my-ns'), { SERVICEBUS_CONNECTION_STRING: cs }, noIdentity), { host: 'my-ns.servicebus.windows.net', connectionString: cs });
    const fromUrl = await resolveAuth(parse('azuresb://k2:v2@my-ns'), { SERVICEBUS_CONNECTION_STRING: 'ignored' }, noIdentity);
    assert.match((fromUrl as { connectionString: string }).connectionString, /SharedAccessKeyName=k2;SharedAccessKey=v2$/);
    await assert.rejects(resolveAuth(parse('azuresb://other-ns'), { SERVICEBUS_CONNECTION_STRING: cs }, noIdentity), rejectsWith('bad-request', /does not match the namespace/));
    await assert.rejects(resolveAuth(parse('azuresb://'), {}, noIdentity), rejectsWith('bad-request', /needs a namespace/));
    await assert.rejects(resolveAuth(parse('azuresb://my-ns'), {}, noIdentity), rejectsWith('missing-client', /set SERVICEBUS_CONNECTION_STRING.*install @azure\/identity/));
    class DefaultAzureCredential {}
    const viaIdentity = await resolveAuth(parse('azuresb://my-ns'), {}, async () => ({ DefaultAzureCredential }));
    assert.equal((viaIdentity as { host: string }).host, 'my-ns.servicebus.windows.net');
    assert.ok((viaIdentity as { credential: unknown }).credential instanceof DefaultAzureCredential);
  });

  it('opens through the real SDK objects and fails with broker-unavailable when the namespace does not answer', { timeout: 60_000 }, async () => {
    const saved = process.env.SERVICEBUS_CONNECTION_STRING;
    process.env.SERVICEBUS_CONNECTION_STRING = 'Endpoint=sb://127.0.0.1:1/;SharedAccessKeyName=k;SharedAccessKey=dg==';
    try {
      await assert.rejects(openBroker('azuresb://'), rejectsWith('broker-unavailable', /cannot use the Service Bus namespace/));
    } finally {
      if (saved === undefined) delete process.env.SERVICEBUS_CONNECTION_STRING;
      else process.env.SERVICEBUS_CONNECTION_STRING = saved;
    }
  });
});
