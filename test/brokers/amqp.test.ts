import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { Connection } from 'rabbitmq-client';
import type { Publisher } from 'rabbitmq-client';
import { describeConformance, Collector, freshTopic } from './conformance.ts';
import { restartBroker, skipUnlessCi, unreachable } from './availability.ts';
import { openBroker } from '../../src/brokers/index.ts';
import { AmqpBroker, parseAmqpUrl } from '../../src/brokers/amqp.ts';
import { RelayError } from '../../src/errors.ts';

const AMQP_URL = process.env.LIVEPIPE_AMQP_URL ?? 'amqp://guest:guest@127.0.0.1:5672';
const server = new URL(AMQP_URL);
const unavailable = await unreachable('RabbitMQ', server.hostname, Number(server.port || 5672));

// The broker's own client, used directly: a second connection that knows nothing of the driver.
let raw: Connection | undefined;
let rawPublisher: Publisher | undefined;
function client(): Connection {
  if (raw === undefined) {
    raw = new Connection({ url: AMQP_URL, retryHigh: 2000 });
    raw.on('error', () => {}); // it reconnects on its own (the restart test stops the server)
  }
  return raw;
}
after(async () => {
  await rawPublisher?.close();
  await raw?.close();
});

async function openAmqp(url = AMQP_URL): Promise<AmqpBroker> {
  const broker = await openBroker(url);
  assert.ok(broker instanceof AmqpBroker);
  return broker;
}

const run = promisify(execFile);
// Only an operator can delete another connection's exclusive queue: rabbitmqctl, as scripts/brokers.sh runs it.
const rabbitmqctl = (...args: string[]) => run('rabbitmqctl', ['-n', 'rabbit@localhost', ...args], { env: { ...process.env, HOME: '/var/lib/rabbitmq' }, timeout: 30_000 });
const noCtl = await rabbitmqctl('-q', 'status').then(() => undefined, () => 'rabbitmqctl cannot reach rabbit@localhost here');
const rejectsWith = (code: string, pattern: RegExp) => (err: unknown) => err instanceof RelayError && err.code === code && pattern.test(err.message);

describeConformance({
  name: 'amqp (RabbitMQ)',
  unavailable,
  open: () => openAmqp(),
  async publishExternally(topic, body) {
    rawPublisher ??= client().createPublisher({ confirm: true, exchanges: [{ exchange: 'livepipe', type: 'topic', durable: true }] });
    await rawPublisher.send({ exchange: 'livepipe', routingKey: topic }, Buffer.from(body));
  },
  unrepresentableTopics: ['x'.repeat(256), '*', '#', 'orders.*', 'orders.#.created', '#.b'],
  // The driver's queue is server-named; a passive declare from another connection finds it if it is still there.
  async leftovers(closed) {
    const queue = (closed as AmqpBroker).queueName;
    assert.match(queue, /^amq\.gen-/);
    try {
      await client().queueDeclare({ queue, passive: true });
      return [`queue ${queue}`];
    } catch (err) {
      // RESOURCE_LOCKED would mean the queue still exists, held by the closed driver's connection.
      return (err as { code?: string }).code === 'NOT_FOUND' ? [] : [`queue ${queue} (${(err as Error).message})`];
    }
  },
  restartServer: () => restartBroker('rabbitmq'),
});

describe('amqp driver', { skip: skipUnlessCi(unavailable) }, () => {
  it('enforces the routing key rules: 255 bytes, no * or # words', async () => {
    const broker = await openAmqp();
    try {
      assert.match(broker.topicProblem('x'.repeat(256)) ?? '', /at most 255 bytes \(this one is 256\)/);
      assert.match(broker.topicProblem('a.*.c') ?? '', /wildcards/);
      await assert.rejects(broker.subscribe('news.#', new Collector()), rejectsWith('invalid-topic', /news\.#.*wildcards/));
      await assert.rejects(broker.publish('*', Buffer.from('x')), rejectsWith('invalid-topic', /wildcards/));
      // * and # inside a word, empty words and a full 255-byte key are ordinary routing keys.
      const run = `${freshTopic('r')}.`;
      const left = 255 - run.length;
      const longest = `${run}${'é'.repeat(Math.floor(left / 2))}${left % 2 ? 'z' : ''}`;
      const topics = [`${run}a*b`, `${run}c#`, `${run}.x.`, longest];
      for (const topic of topics) assert.equal(broker.topicProblem(topic), undefined, topic);
      assert.equal(Buffer.byteLength(topics[3]!), 255);
      const collectors = await Promise.all(topics.map(async (topic) => {
        const c = new Collector();
        await broker.subscribe(topic, c);
        return c;
      }));
      for (const topic of topics) await broker.publish(topic, Buffer.from(topic));
      for (const [i, c] of collectors.entries()) {
        await c.until(() => c.bodies.length === 1, 5000, `message on ${topics[i]}`);
        assert.deepEqual(c.texts(), [topics[i]]);
      }
    } finally {
      await broker.close();
    }
  });

  it('parses its URL options and rejects bad ones with bad-request', () => {
    const parse = (url: string) => parseAmqpUrl(new URL(url));
    assert.deepEqual(parse('amqp://h'), { exchange: 'livepipe', clientUrl: 'amqp://h' });
    assert.deepEqual(parse('rabbit://u:p@h:5673/vh?exchange=events.v1&heartbeat=30'), { exchange: 'events.v1', clientUrl: 'amqp://u:p@h:5673/vh?heartbeat=30' });
    assert.equal(parse('amqps://h?exchange=x').clientUrl, 'amqps://h');
    assert.throws(() => parse('amqp://h?exchange='), rejectsWith('bad-request', /exchange="" is not an exchange name/));
    assert.throws(() => parse('amqp://h?exchange=a%20b'), rejectsWith('bad-request', /exchange="a b"/));
    assert.throws(() => parse('amqp://h?heartbeat=soon'), rejectsWith('bad-request', /heartbeat="soon" must be a whole number/));
    assert.throws(() => parse('amqp://h?exchnage=x'), rejectsWith('bad-request', /unknown amqp:\/\/ option "exchnage" \(known: exchange, heartbeat/));
  });

  it('uses the exchange named in the URL, under the rabbit:// scheme too', async () => {
    const exchange = `livepipe-test-${randomBytes(4).toString('hex')}`;
    const mine = await openAmqp(`${AMQP_URL.replace(/^amqp:/, 'rabbit:')}?exchange=${exchange}`);
    const other = await openAmqp();
    try {
      const topic = freshTopic();
      const c = new Collector();
      await mine.subscribe(topic, c);
      await other.publish(topic, Buffer.from('elsewhere'));
      await mine.publish(topic, Buffer.from('here'));
      await c.until(() => c.bodies.length === 1, 5000, 'the message on the named exchange');
      await new Promise((r) => setTimeout(r, 200));
      assert.deepEqual(c.texts(), ['here']);
    } finally {
      await mine.close();
      await other.close();
      await client().exchangeDelete({ exchange });
    }
  });

  it('delivers text/plain bodies of other publishers unchanged, JSON bodies as equal JSON', async () => {
    const broker = await openAmqp();
    const publisher = client().createPublisher({ confirm: true });
    try {
      const topic = freshTopic();
      const c = new Collector();
      await broker.subscribe(topic, c);
      await publisher.send({ exchange: 'livepipe', routingKey: topic }, 'héllo wörld'); // sent as text/plain
      // rabbitmq-client parses application/json bodies before the driver sees them (see amqp.ts).
      await publisher.send({ exchange: 'livepipe', routingKey: topic, contentType: 'application/json' }, Buffer.from('{"a": [1, 2]}'));
      await c.until(() => c.bodies.length === 2, 5000, 'two messages');
      assert.equal(c.texts()[0], 'héllo wörld');
      assert.deepEqual(JSON.parse(c.texts()[1]!), { a: [1, 2] });
    } finally {
      await publisher.close();
      await broker.close();
    }
  });

  it('reports a queue deleted by an operator and recovers with a new one', { skip: skipUnlessCi(noCtl) }, async () => {
    const broker = await openAmqp();
    try {
      const topic = freshTopic();
      const c = new Collector();
      await broker.subscribe(topic, c);
      const queue = broker.queueName;
      await rabbitmqctl('delete_queue', queue);
      await c.until(() => c.recoveries === 1, 10_000, 'an error and a recovery');
      assert.equal(c.errors[0]?.code, 'subscription-failure');
      assert.notEqual(broker.queueName, queue);
      await broker.publish(topic, Buffer.from('again'));
      await c.until(() => c.bodies.length === 1, 5000, 'delivery through the new queue');
    } finally {
      await broker.close();
    }
  });

  it('fails to open, with broker-unavailable, when nothing listens', { timeout: 30_000 }, async () => {
    await assert.rejects(openBroker('amqp://guest:guest@127.0.0.1:1'), rejectsWith('broker-unavailable', /cannot connect to RabbitMQ/));
  });
});
