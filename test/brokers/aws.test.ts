import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { SNSClient, CreateTopicCommand, PublishCommand, ListSubscriptionsByTopicCommand } from '@aws-sdk/client-sns';
import { SQSClient, CreateQueueCommand, DeleteQueueCommand, GetQueueAttributesCommand, ListQueuesCommand, SendMessageCommand } from '@aws-sdk/client-sqs';
import { describeConformance, Collector, rejectsWith, sleep, openDriver } from './conformance.ts';
import { restartEmulator, skipUnlessCi, unreachable } from './availability.ts';
import { openBroker } from '../../src/brokers/index.ts';
import { AwsSnsBroker, AwsSqsBroker, encodeBody, parseAwsUrl } from '../../src/brokers/aws.ts';

// moto in server mode (scripts/cloud-emulators.sh up moto) stands in for SNS and SQS.
const ENDPOINT = process.env.LIVEPIPE_AWS_ENDPOINT ?? 'http://127.0.0.1:4566';
const REGION = 'us-east-1';
// moto takes any key; setting one also keeps the SDK from asking the EC2 metadata service.
process.env.AWS_ACCESS_KEY_ID ??= 'test';
process.env.AWS_SECRET_ACCESS_KEY ??= 'test';
process.env.AWS_EC2_METADATA_DISABLED = 'true';
const endpoint = new URL(ENDPOINT);
const down = await unreachable('moto (SNS/SQS)', endpoint.hostname, Number(endpoint.port || 80));
const unavailable = down && `${down}; start it with: scripts/cloud-emulators.sh up moto`;
const QUERY = `endpoint=${encodeURIComponent(ENDPOINT)}&region=${REGION}`;
const SNS_URL = `awssns://?${QUERY}`;

// The AWS SDK used directly: it knows nothing of the driver.
const sdk = { endpoint: ENDPOINT, region: REGION };
const sns = new SNSClient(sdk);
const sqs = new SQSClient(sdk);
after(() => {
  sns.destroy();
  sqs.destroy();
});

/** SNS names hold no dot: `conf-<hex>`. */
const snsTopic = (prefix = 'conf') => `${prefix}-${randomBytes(6).toString('hex')}`;

const openSns = (url = SNS_URL): Promise<AwsSnsBroker> => openDriver(url, AwsSnsBroker);

/** Publishes with the SNS SDK, binary bodies base64-encoded under the documented attribute. */
async function publishViaSdk(topic: string, body: Uint8Array): Promise<void> {
  const { TopicArn } = await sns.send(new CreateTopicCommand({ Name: topic }));
  const text = Buffer.from(body).toString('utf8');
  const binary = !Buffer.from(text, 'utf8').equals(Buffer.from(body)) || /[\u0000-\u0008\u000b\u000c\u000e-\u001f\ufffe\uffff]/.test(text);
  await sns.send(new PublishCommand({
    TopicArn,
    Message: binary ? Buffer.from(body).toString('base64') : text,
    MessageAttributes: binary ? { 'livepipe-encoding': { DataType: 'String', StringValue: 'base64' } } : undefined,
  }));
}

/** SNS subscriptions of `topics` that deliver to `queueArn`, and queues named `queueName`. */
async function snsLeftovers(queueName: string, queueArn: string, topics: string[]): Promise<string[]> {
  const left: string[] = [];
  const queues = await sqs.send(new ListQueuesCommand({ QueueNamePrefix: queueName }));
  for (const url of queues.QueueUrls ?? []) left.push(`queue ${url}`);
  for (const topic of topics) {
    const { TopicArn } = await sns.send(new CreateTopicCommand({ Name: topic }));
    const subs = await sns.send(new ListSubscriptionsByTopicCommand({ TopicArn }));
    for (const s of subs.Subscriptions ?? []) if (s.Endpoint === queueArn) left.push(`subscription ${s.SubscriptionArn}`);
  }
  return left;
}

describeConformance({
  name: 'awssns (moto)',
  unavailable,
  open: () => openSns(),
  freshTopic: () => snsTopic(),
  publishExternally: publishViaSdk,
  // 256 KiB of text; a binary body travels base64-encoded, 4/3 of its size.
  maxBodyBytes: 190 * 1024,
  unrepresentableTopics: ['orders.created', 'Ünïcødé', 'a b', 'news/today', 'x'.repeat(257), '.fifo', 'a.fifo.b', 'a:b'],
  // SNS names are ASCII letters, digits, _ and - only: orders.created and Ünïcødé are listed above.
  representableTopics: ['chat', 'user-42', 'a_b', 'orders-created', 'orders.fifo', 'x'.repeat(256)],
  async leftovers(closed, topics) {
    const broker = closed as AwsSnsBroker;
    assert.match(broker.queueName, /^livepipe-[0-9a-f]{16}$/);
    return snsLeftovers(broker.queueName, broker.queueArn, topics);
  },
  // moto keeps everything in memory: the restart loses the queue and topics, which the driver recreates.
  restartServer: () => restartEmulator('moto'),
});

describe('awssns driver', { skip: skipUnlessCi(unavailable) }, () => {
  it('enforces the SNS topic name rules', async () => {
    const broker = await openSns();
    try {
      assert.match(broker.topicProblem('orders.created') ?? '', /only A-Z a-z 0-9 _ - \(and may end in \.fifo/);
      assert.match(broker.topicProblem('x'.repeat(257)) ?? '', /at most 256 characters \(this one is 257\)/);
      await assert.rejects(broker.subscribe('a.b', new Collector()), rejectsWith('invalid-topic', /"a\.b".*only A-Z/));
      await assert.rejects(broker.publish('é', Buffer.from('x')), rejectsWith('invalid-topic', /only A-Z/));
    } finally {
      await broker.close();
    }
  });

  it('reads one queue per process, subscribed to each topic, with a policy for SNS and short retention', async () => {
    const broker = await openSns();
    try {
      const [t1, t2] = [snsTopic(), snsTopic()];
      const c1 = new Collector();
      const c2 = new Collector();
      await broker.subscribe(t1, c1);
      await broker.subscribe(t2, c2);
      const second = new Collector();
      const s = await broker.subscribe(t1, second); // a second listener shares the SNS subscription
      const queues = await sqs.send(new ListQueuesCommand({ QueueNamePrefix: broker.queueName }));
      assert.deepEqual(queues.QueueUrls, [broker.queueUrl]);
      const { Attributes } = await sqs.send(new GetQueueAttributesCommand({ QueueUrl: broker.queueUrl, AttributeNames: ['All'] }));
      assert.equal(Attributes?.MessageRetentionPeriod, '60');
      const statement = JSON.parse(Attributes!.Policy!).Statement[0];
      assert.deepEqual(statement.Principal, { Service: 'sns.amazonaws.com' });
      assert.equal(statement.Action, 'sqs:SendMessage');
      assert.equal(statement.Resource, broker.queueArn);
      assert.deepEqual(statement.Condition, { ArnLike: { 'aws:SourceArn': 'arn:aws:sns:us-east-1:123456789012:*' } });
      for (const topic of [t1, t2]) {
        const { TopicArn } = await sns.send(new CreateTopicCommand({ Name: topic }));
        const subs = await sns.send(new ListSubscriptionsByTopicCommand({ TopicArn }));
        assert.deepEqual(subs.Subscriptions?.map((x) => [x.Protocol, x.Endpoint]), [['sqs', broker.queueArn]]);
      }
      await broker.publish(t1, Buffer.from('one'));
      await broker.publish(t2, Buffer.from('two'));
      await c1.until(() => c1.bodies.length === 1 && second.bodies.length === 1, 10_000, 'both listeners of t1');
      await c2.until(() => c2.bodies.length === 1, 10_000, 't2');
      assert.deepEqual([c1.texts(), second.texts(), c2.texts()], [['one'], ['one'], ['two']]);
      await s.close();
      assert.equal((await snsLeftovers('-', broker.queueArn, [t1])).length, 1, 'the first listener still needs it');
    } finally {
      await broker.close();
    }
  });

  it('delivers text from other publishers as UTF-8, and FIFO topics too', async () => {
    const broker = await openSns();
    try {
      const topic = snsTopic();
      const fifo = `${snsTopic()}.fifo`;
      const c = new Collector();
      const f = new Collector();
      await broker.subscribe(topic, c);
      await broker.subscribe(fifo, f);
      await publishViaSdk(topic, Buffer.from('héllo\r\n"wörld" 🎉'));
      await broker.publish(fifo, Buffer.from([0, 1, 2]));
      await broker.publish(fifo, Buffer.from('second'));
      await c.until(() => c.bodies.length === 1, 10_000, 'the text message');
      assert.equal(c.texts()[0], 'héllo\r\n"wörld" 🎉');
      await f.until(() => f.bodies.length === 2, 10_000, 'two FIFO messages');
      assert.deepEqual(f.bodies, [Buffer.from([0, 1, 2]), Buffer.from('second')]);
    } finally {
      await broker.close();
    }
  });

  it('sends text as text and anything else base64 under livepipe-encoding; refuses empty and oversized bodies', async () => {
    assert.deepEqual(encodeBody(Buffer.from('héllo\t\r\n')), { text: 'héllo\t\r\n', base64: false });
    assert.deepEqual(encodeBody(Buffer.from('a\u0000b')), { text: Buffer.from('a\u0000b').toString('base64'), base64: true });
    assert.deepEqual(encodeBody(Buffer.from([0xc3, 0x28])), { text: 'wyg=', base64: true }); // not UTF-8
    assert.equal(encodeBody(Buffer.from('\uffff')).base64, true); // UTF-8, but outside the set SQS accepts
    assert.throws(() => encodeBody(new Uint8Array()), rejectsWith('bad-request', /cannot carry an empty message/));
    const broker = await openSns();
    try {
      const topic = snsTopic();
      await assert.rejects(broker.publish(topic, Buffer.alloc(256 * 1024 + 1, 'x')), rejectsWith('too-large', /at most 262144 bytes/));
      await assert.rejects(broker.publish(topic, Buffer.alloc(200 * 1024, 0)), rejectsWith('too-large', /base64-encoded/));
    } finally {
      await broker.close();
    }
  });

  it('parses its URL options and rejects bad ones with bad-request', () => {
    const parse = (url: string) => parseAwsUrl(new URL(url));
    assert.deepEqual(parse('awssns://'), { region: undefined, endpoint: undefined, queue: '' });
    assert.deepEqual(parse('awssns://?region=eu-west-1&endpoint=http://127.0.0.1:4566/'), { region: 'eu-west-1', endpoint: 'http://127.0.0.1:4566', queue: '' });
    assert.deepEqual(parse('awssqs://jobs').queue, 'jobs');
    assert.deepEqual(parse('awssqs://sqs.us-east-2.amazonaws.com/123456789012/jobs').queue, 'https://sqs.us-east-2.amazonaws.com/123456789012/jobs');
    assert.deepEqual(parse('awssqs://localhost/123456789012/jobs?endpoint=http://127.0.0.1:4566').queue, 'http://127.0.0.1:4566/123456789012/jobs');
    assert.throws(() => parse('awssns://topic-name'), rejectsWith('bad-request', /takes no host or path/));
    assert.throws(() => parse('awssqs://'), rejectsWith('bad-request', /needs a queue name or URL/));
    assert.throws(() => parse('awssns://?region=Mars%201'), rejectsWith('bad-request', /region="Mars 1" is not a region name/));
    assert.throws(() => parse('awssns://?endpoint=127.0.0.1:4566'), rejectsWith('bad-request', /endpoint="127\.0\.0\.1:4566" is not an http\(s\):\/\/host/));
    assert.throws(() => parse('awssqs://q?wait=5'), rejectsWith('bad-request', /unknown awssqs:\/\/ option "wait" \(known: region, endpoint\)/));
  });

  it('fails to open, with broker-unavailable, when nothing listens', { timeout: 60_000 }, async () => {
    await assert.rejects(openBroker(`awssns://?endpoint=http://127.0.0.1:1&region=${REGION}`), rejectsWith('broker-unavailable', /cannot create the SQS queue/));
  });
});

describe('awssqs driver (one queue, one consumer)', { skip: skipUnlessCi(unavailable) }, () => {
  const queues: string[] = [];
  async function makeQueue(fifo = false): Promise<{ name: string; url: string }> {
    const name = `livepipe-test-${randomBytes(4).toString('hex')}${fifo ? '.fifo' : ''}`;
    const out = await sqs.send(new CreateQueueCommand({ QueueName: name, Attributes: fifo ? { FifoQueue: 'true', ContentBasedDeduplication: 'true' } : undefined }));
    queues.push(out.QueueUrl!);
    return { name, url: out.QueueUrl! };
  }
  after(async () => {
    for (const url of queues) await sqs.send(new DeleteQueueCommand({ QueueUrl: url })).catch(() => {});
  });

  it('delivers by the topic attribute, the queue name without one, and decodes base64 bodies', async () => {
    const { name, url } = await makeQueue();
    const broker = await openBroker(`awssqs://${name}?${QUERY}`);
    assert.ok(broker instanceof AwsSqsBroker);
    try {
      assert.equal(broker.queueUrl, url);
      assert.equal(broker.topicProblem(), undefined);
      const orders = new Collector();
      const plain = new Collector();
      await broker.subscribe('orders.created', orders);
      await broker.subscribe(name, plain);
      const attr = (v: string) => ({ DataType: 'String', StringValue: v });
      await sqs.send(new SendMessageCommand({ QueueUrl: url, MessageBody: 'ignored', MessageAttributes: { topic: attr('nobody-listens') } }));
      await sqs.send(new SendMessageCommand({ QueueUrl: url, MessageBody: 'order 1', MessageAttributes: { topic: attr('orders.created') } }));
      await sqs.send(new SendMessageCommand({ QueueUrl: url, MessageBody: 'AP8=', MessageAttributes: { topic: attr('orders.created'), 'livepipe-encoding': attr('base64') } }));
      await sqs.send(new SendMessageCommand({ QueueUrl: url, MessageBody: 'no attribute' }));
      await broker.publish('orders.created', Buffer.from([0xde, 0xad, 0xbe, 0xef]));
      await orders.until(() => orders.bodies.length === 3, 10_000, 'three orders');
      assert.deepEqual(orders.bodies, [Buffer.from('order 1'), Buffer.from([0, 0xff]), Buffer.from([0xde, 0xad, 0xbe, 0xef])]);
      await plain.until(() => plain.bodies.length === 1, 10_000, 'the message without a topic');
      assert.deepEqual(plain.texts(), ['no attribute']);
      // Everything was consumed, the message for a topic nobody wanted included. Deletes follow
      // the hand-off, so the count may need a moment to reach 0.
      const counts = async () => (await sqs.send(new GetQueueAttributesCommand({ QueueUrl: url, AttributeNames: ['ApproximateNumberOfMessages', 'ApproximateNumberOfMessagesNotVisible'] }))).Attributes;
      let Attributes = await counts();
      for (const deadline = Date.now() + 5_000; Attributes?.ApproximateNumberOfMessagesNotVisible !== '0' && Date.now() < deadline; Attributes = await counts()) await sleep(100);
      assert.deepEqual(Attributes, { ApproximateNumberOfMessages: '0', ApproximateNumberOfMessagesNotVisible: '0' });
      assert.equal(broker.isConnected(), true);
    } finally {
      await broker.close();
    }
    assert.equal(broker.isConnected(), false);
  });

  it('opens a queue by URL, a FIFO one in order, and leaves the queue alone while nobody listens', async () => {
    const { url } = await makeQueue(true);
    const path = new URL(url).pathname;
    const broker = await openBroker(`awssqs://localhost${path}?${QUERY}`);
    try {
      const c = new Collector();
      const sub = await broker.subscribe('t', c);
      for (let i = 0; i < 20; i++) await broker.publish('t', Buffer.from(String(i)));
      await c.until(() => c.bodies.length === 20, 10_000, '20 messages');
      assert.deepEqual(c.texts(), Array.from({ length: 20 }, (_, i) => String(i)));
      await sub.close();
      await broker.publish('t', Buffer.from('kept for later'));
      const { Attributes } = await sqs.send(new GetQueueAttributesCommand({ QueueUrl: url, AttributeNames: ['ApproximateNumberOfMessages'] }));
      assert.equal(Attributes?.ApproximateNumberOfMessages, '1');
      const later = new Collector();
      await broker.subscribe('t', later);
      await later.until(() => later.bodies.length === 1, 10_000, 'the kept message');
      assert.deepEqual(later.texts(), ['kept for later']);
    } finally {
      await broker.close();
    }
  });

  it('fails to open a missing queue with broker-unavailable', async () => {
    await assert.rejects(openBroker(`awssqs://no-such-queue-${randomBytes(4).toString('hex')}?${QUERY}`), rejectsWith('broker-unavailable', /queue "no-such-queue-.*" does not exist/));
  });
});
