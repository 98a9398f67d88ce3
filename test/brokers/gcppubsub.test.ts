import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { PubSub } from '@google-cloud/pubsub';
import type { Topic } from '@google-cloud/pubsub';
import { describeConformance, Collector, freshTopic, rejectsWith, subscribeAll, openDriver } from './conformance.ts';
import { restartEmulator, skipUnlessCi, unreachable } from './availability.ts';
import { openBroker } from '../../src/brokers/index.ts';
import { GcpPubSubBroker, parseGcpPubSubUrl } from '../../src/brokers/gcppubsub.ts';

// Google's in-memory Pub/Sub server (scripts/pubsub-emulator), started by scripts/cloud-emulators.sh.
process.env.PUBSUB_EMULATOR_HOST ??= '127.0.0.1:8085';
// Keeps the Google auth library from probing the GCE metadata server (no such host here).
process.env.METADATA_SERVER_DETECTION ??= 'none';
const [host, port] = process.env.PUBSUB_EMULATOR_HOST.split(':') as [string, string];
const unavailable = await unreachable('the Pub/Sub emulator', host, Number(port));
const PROJECT = 'livepipe-test';
const URL_ = `gcppubsub://${PROJECT}`;

// Google's own client, used directly: it knows nothing of the driver.
const raw = new PubSub({ projectId: PROJECT });
const rawTopics = new Map<string, Topic>();
after(() => raw.close());

const openPubSub = (url = URL_): Promise<GcpPubSubBroker> => openDriver(url, GcpPubSubBroker);

/** Subscription ids in the emulator that belong to driver instance `instanceId`. */
async function subscriptionsOf(instanceId: string): Promise<string[]> {
  const [subs] = await raw.getSubscriptions();
  return subs.map((s) => s.name.split('/').pop()!).filter((name) => name.startsWith(`livepipe-${instanceId}-`));
}

describeConformance({
  name: 'gcppubsub (pstest emulator)',
  unavailable: unavailable && `${unavailable}; start it with: scripts/cloud-emulators.sh up pubsub`,
  open: () => openPubSub(),
  async publishExternally(topic, body) {
    let t = rawTopics.get(topic);
    if (t === undefined) rawTopics.set(topic, (t = raw.topic(topic, { messageOrdering: true })));
    // One ordering key per topic, as the driver's docs ask of publishers that need order.
    await t.publishMessage({ data: Buffer.from(body), orderingKey: topic });
  },
  unrepresentableTopics: ['ab', 'x'.repeat(256), '1abc', '-abc', '_abc', 'goog-news', 'a b', 'a/b', 'a:b', 'a*b', 'Ünïcødé', 'cafés'],
  // Pub/Sub topic ids are ASCII: Ünïcødé is listed above instead.
  representableTopics: ['chat', 'orders.created', 'user-42', 'a_b', 'a~b+c%41'],
  async leftovers(closed) {
    return subscriptionsOf((closed as GcpPubSubBroker).instanceId);
  },
  // pstest keeps everything in memory: a restart loses topics and subscriptions, which the driver recreates.
  restartServer: () => restartEmulator('pubsub'),
});

describe('gcppubsub driver', { skip: skipUnlessCi(unavailable) }, () => {
  it('enforces the topic id rules and names each in its error', async () => {
    const broker = await openPubSub();
    try {
      assert.match(broker.topicProblem('ab') ?? '', /3 to 255 characters long \(this one is 2\)/);
      assert.match(broker.topicProblem('x'.repeat(256)) ?? '', /3 to 255 characters long \(this one is 256\)/);
      assert.match(broker.topicProblem('9lives') ?? '', /starts with a letter/);
      assert.match(broker.topicProblem('news/today') ?? '', /only letters, digits and - _ \. ~ \+ %/);
      assert.match(broker.topicProblem('goog-news') ?? '', /must not start with "goog"/);
      await assert.rejects(broker.subscribe('news/today', new Collector()), rejectsWith('invalid-topic', /news\/today.*only letters/));
      await assert.rejects(broker.publish('ab', Buffer.from('x')), rejectsWith('invalid-topic', /3 to 255/));
      // The extremes of the rules are real topic ids: 3 and 255 characters, every allowed sign.
      const run = `t${freshTopic('').slice(1)}`;
      const topics = [`abc`, `${run}${'y'.repeat(255 - run.length)}`, `${run}-_.~+%`, `Google${run}`];
      for (const topic of topics) assert.equal(broker.topicProblem(topic), undefined, topic);
      const collectors = await subscribeAll(broker, topics);
      for (const topic of topics) await broker.publish(topic, Buffer.from(topic));
      for (const [i, c] of collectors.entries()) {
        await c.until(() => c.texts().includes(topics[i]!), 5000, `message on ${topics[i]}`);
      }
    } finally {
      await broker.close();
    }
  });

  it('parses its URL and rejects bad ones with bad-request', () => {
    const parse = (url: string) => parseGcpPubSubUrl(new URL(url));
    assert.deepEqual(parse('gcppubsub://my-project'), { projectId: 'my-project', createTopics: true });
    assert.deepEqual(parse('gcppubsub://my-project?create_topics=false'), { projectId: 'my-project', createTopics: false });
    assert.throws(() => parse('gcppubsub://'), rejectsWith('bad-request', /needs the project id/));
    assert.throws(() => parse('gcppubsub://p/topics/x'), rejectsWith('bad-request', /needs the project id/));
    assert.throws(() => parse('gcppubsub://p?create_topics=no'), rejectsWith('bad-request', /create_topics="no" must be true or false/));
    assert.throws(() => parse('gcppubsub://p?topic=x'), rejectsWith('bad-request', /unknown gcppubsub:\/\/ option "topic" \(known: create_topics\)/));
  });

  it('shares one subscription per topic per process, with expiry, short retention and ordering', async () => {
    const broker = await openPubSub();
    try {
      const topic = freshTopic();
      const one = new Collector();
      const two = new Collector();
      const s1 = await broker.subscribe(topic, one);
      const s2 = await broker.subscribe(topic, two);
      const names = await subscriptionsOf(broker.instanceId);
      assert.equal(names.length, 1);
      const [meta] = await raw.subscription(names[0]!).getMetadata();
      assert.equal(meta.topic, `projects/${PROJECT}/topics/${topic}`);
      assert.equal(Number(meta.expirationPolicy?.ttl?.seconds), 86_400);
      assert.equal(Number(meta.messageRetentionDuration?.seconds), 600);
      assert.equal(meta.enableMessageOrdering, true);
      await broker.publish(topic, Buffer.from('both'));
      await one.until(() => one.bodies.length === 1, 5000, 'listener one');
      await two.until(() => two.bodies.length === 1, 5000, 'listener two');
      await s1.close();
      assert.deepEqual(await subscriptionsOf(broker.instanceId), names, 'the second listener still needs it');
      await s2.close();
      assert.deepEqual(await subscriptionsOf(broker.instanceId), []);
    } finally {
      await broker.close();
    }
  });

  it('with create_topics=false, refuses missing topics instead of creating them', async () => {
    const broker = await openPubSub(`${URL_}?create_topics=false`);
    try {
      const topic = freshTopic();
      await assert.rejects(broker.subscribe(topic, new Collector()), rejectsWith('subscription-failure', /does not exist \(and create_topics=false\)/));
      await assert.rejects(broker.publish(topic, Buffer.from('x')), rejectsWith('broker-unavailable', /topic ".*" does not exist/));
      const [topics] = await raw.getTopics();
      assert.ok(!topics.some((t) => t.name.endsWith(`/${topic}`)), 'the topic was created');
      await raw.createTopic(topic);
      const c = new Collector();
      await broker.subscribe(topic, c);
      await broker.publish(topic, Buffer.from('now it exists'));
      await c.until(() => c.bodies.length === 1, 5000, 'the message');
    } finally {
      await broker.close();
    }
  });

  it('fails to open, with broker-unavailable, when nothing listens', { timeout: 30_000 }, async () => {
    const saved = process.env.PUBSUB_EMULATOR_HOST;
    process.env.PUBSUB_EMULATOR_HOST = '127.0.0.1:1';
    try {
      await assert.rejects(openBroker(URL_), rejectsWith('broker-unavailable', /cannot reach Google Cloud Pub\/Sub/));
    } finally {
      process.env.PUBSUB_EMULATOR_HOST = saved;
    }
  });
});
