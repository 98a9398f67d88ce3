import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { Admin, Producer } from '@platformatic/kafka';
import { describeConformance, Collector, DEFAULT_REPRESENTABLE, freshTopic, rejectsWith, sleep, openDriver } from './conformance.ts';
import { restartBroker, skipUnlessCi, unreachable } from './availability.ts';
import { openBroker } from '../../src/brokers/index.ts';
import { KafkaBroker, parseKafkaUrl } from '../../src/brokers/kafka.ts';

const KAFKA_URL = process.env.LIVEPIPE_KAFKA_URL ?? 'kafka://127.0.0.1:9092';
const server = new URL(KAFKA_URL);
const bootstrapBrokers = [`${server.hostname}:${server.port || 9092}`];
const unavailable = await unreachable('Kafka', server.hostname, Number(server.port || 9092));

// The broker's own clients, used directly.
let producer: Producer | undefined;
let admin: Admin | undefined;
const rawProducer = () => (producer ??= new Producer({ clientId: 'livepipe-test-producer', bootstrapBrokers }));
const rawAdmin = () => (admin ??= new Admin({ clientId: 'livepipe-test-admin', bootstrapBrokers }));
after(async () => {
  if (admin !== undefined) {
    // Kafka keeps topics until deleted: remove the ones this run's tests made (freshTopic names).
    const mine = (await admin.listTopics()).filter((t) => /^(conf|k)\.[0-9a-f]{12}$/.test(t));
    if (mine.length > 0) await admin.deleteTopics({ topics: mine });
  }
  await producer?.close();
  await admin?.close();
});

const openKafka = (url = KAFKA_URL): Promise<KafkaBroker> => openDriver(url, KafkaBroker);

describeConformance({
  name: 'kafka',
  unavailable,
  open: () => openKafka(),
  async publishExternally(topic, body) {
    await rawProducer().send({ messages: [{ topic, value: Buffer.from(body) }] });
  },
  // 'Ünïcødé' is in the suite's list of ordinary topics, but Kafka cannot name it (see the report).
  unrepresentableTopics: ['x'.repeat(250), '.', '..', 'a b', 'user:42', 'a/b', 'Ünïcødé'],
  // Kafka names are ASCII only ([a-zA-Z0-9._-]); a non-ASCII topic is refused, never rewritten.
  representableTopics: DEFAULT_REPRESENTABLE.filter((t) => /^[a-zA-Z0-9._-]+$/.test(t)),
  // The driver joins no consumer group; prove that no group knows its client id.
  async leftovers(closed) {
    const { clientId } = closed as KafkaBroker;
    const groups = [...(await rawAdmin().listGroups()).keys()];
    const found = groups.filter((g) => g === clientId);
    if (groups.length > 0) {
      for (const [id, group] of await rawAdmin().describeGroups({ groups })) {
        for (const member of group.members.values()) if (member.clientId === clientId) found.push(`member of group ${id}`);
      }
    }
    return found;
  },
  restartServer: () => restartBroker('kafka'),
  timeoutMs: 60_000,
});

describe('kafka driver', { skip: skipUnlessCi(unavailable), timeout: 120_000 }, () => {
  it("enforces Kafka's topic name rules", async () => {
    const broker = await openKafka();
    try {
      assert.equal(broker.topicProblem('x'.repeat(249)), undefined);
      assert.equal(broker.topicProblem('Orders.v1_created-EU'), undefined);
      assert.match(broker.topicProblem('x'.repeat(250)) ?? '', /1 to 249 of the characters a-z A-Z 0-9 \. _ -/);
      assert.match(broker.topicProblem('..') ?? '', /\. and \.\./);
      await assert.rejects(broker.subscribe('chat:room', new Collector()), rejectsWith('invalid-topic', /"chat:room".*249/));
      await assert.rejects(broker.publish('a b', Buffer.from('x')), rejectsWith('invalid-topic', /"a b"/));
    } finally {
      await broker.close();
    }
  });

  it('parses its URL options and rejects bad ones with bad-request', () => {
    const parse = (url: string) => parseKafkaUrl(new URL(url));
    assert.deepEqual(parse('kafka://k1'), { bootstrapBrokers: ['k1:9092'], createTopics: true });
    assert.deepEqual(parse('kafka://k1:9093?brokers=k2:9092,10.0.0.3:19092&create_topics=false'), {
      bootstrapBrokers: ['k1:9093', 'k2:9092', '10.0.0.3:19092'],
      createTopics: false,
    });
    assert.throws(() => parse('kafka://'), rejectsWith('bad-request', /names a bootstrap server/));
    assert.throws(() => parse('kafka://k1?brokers=k2'), rejectsWith('bad-request', /brokers: "k2" is not host:port/));
    assert.throws(() => parse('kafka://k1?create_topics=yes'), rejectsWith('bad-request', /create_topics="yes" must be true or false/));
    assert.throws(() => parse('kafka://k1?group=x'), rejectsWith('bad-request', /unknown kafka:\/\/ option "group" \(known: brokers, create_topics\)/));
  });

  it('creates a missing topic on subscribe, unless create_topics=false', async () => {
    const strict = await openKafka(`${KAFKA_URL}?create_topics=false`);
    const broker = await openKafka();
    try {
      const topic = freshTopic('k');
      await assert.rejects(strict.subscribe(topic, new Collector()), rejectsWith('subscription-failure', /does not exist \(and create_topics=false\)/));
      const c = new Collector();
      await broker.subscribe(topic, c);
      const metadata = await rawAdmin().metadata({ topics: [topic] });
      assert.equal(metadata.topics.get(topic)?.partitionsCount, 1, "the test broker's default partition count");
      const s = new Collector();
      await strict.subscribe(topic, s); // it exists now
      await rawProducer().send({ messages: [{ topic, value: Buffer.from('first') }] });
      await c.until(() => c.bodies.length === 1, 10_000, 'the first message');
      await s.until(() => s.bodies.length === 1, 10_000, 'the first message (create_topics=false)');
      // Publishing creates a missing topic as well.
      const unheard = freshTopic('k');
      await broker.publish(unheard, Buffer.from('into the void'));
      assert.equal((await rawAdmin().metadata({ topics: [unheard] })).topics.get(unheard)?.partitionsCount, 1);
    } finally {
      await strict.close();
      await broker.close();
    }
  });

  it('reads every partition, each in order, from the subscribe position on', async () => {
    const topic = freshTopic('k');
    await rawAdmin().createTopics({ topics: [topic], partitions: 3 });
    await rawProducer().send({ messages: [0, 1, 2].map((partition) => ({ topic, partition, value: Buffer.from(`old ${partition}`) })) });
    const broker = await openKafka();
    try {
      const c = new Collector();
      await broker.subscribe(topic, c);
      const messages = [];
      for (let i = 0; i < 30; i++) messages.push({ topic, partition: i % 3, value: Buffer.from(`p${i % 3} ${i}`) });
      await rawProducer().send({ messages });
      await c.until(() => c.bodies.length === 30, 20_000, '30 messages over 3 partitions');
      for (const p of [0, 1, 2]) {
        const got = c.texts().filter((t) => t.startsWith(`p${p} `));
        assert.deepEqual(got, messages.filter((m) => m.partition === p).map((m) => m.value.toString()), `partition ${p} order`);
      }
    } finally {
      await broker.close();
    }
  });

  it('reports a deleted topic on that topic only, and recovers when it is back', async () => {
    const broker = await openKafka();
    try {
      const gone = freshTopic('k');
      const kept = freshTopic('k');
      const g = new Collector();
      const k = new Collector();
      await broker.subscribe(gone, g);
      await broker.subscribe(kept, k);
      await rawAdmin().deleteTopics({ topics: [gone] });
      await g.until(() => g.errors.length === 1, 30_000, 'the deleted topic to be reported');
      assert.match(g.errors[0]!.message, /no longer exists/);
      await rawProducer().send({ messages: [{ topic: kept, value: Buffer.from('still here') }] });
      await k.until(() => k.bodies.length === 1, 10_000, 'delivery on the other topic');
      assert.equal(k.errors.length, 0);
      assert.equal(broker.isConnected(), true);
      // Recreated: everything in it is new, so the first message must arrive.
      for (let created = false; !created; await sleep(500)) {
        created = await rawAdmin().createTopics({ topics: [gone] }).then(() => true, () => false); // deletion completes asynchronously
      }
      await rawProducer().send({ messages: [{ topic: gone, value: Buffer.from('back') }] });
      await g.until(() => g.recoveries === 1 && g.bodies.length === 1, 30_000, 'recovery and the new message');
      assert.deepEqual(g.texts(), ['back']);
    } finally {
      await broker.close();
    }
  });

  it('fails to open, with broker-unavailable, when nothing listens', async () => {
    await assert.rejects(openBroker('kafka://127.0.0.1:1'), rejectsWith('broker-unavailable', /cannot connect to Kafka: Connection to 127.0.0.1:1 failed/));
  });
});
