import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { connect, errors } from '@nats-io/transport-node';
import type { NatsConnection } from '@nats-io/transport-node';
import { jetstream, jetstreamManager } from '@nats-io/jetstream';
import { assertReplays, describeConformance, Collector, freshTopic, rejectsWith, sleep, openDriver } from './conformance.ts';
import { restartBroker, skipUnlessCi, unreachable } from './availability.ts';
import { openBroker } from '../../src/brokers/index.ts';
import type { Broker } from '../../src/brokers/broker.ts';
import { NatsBroker } from '../../src/brokers/nats.ts';

const NATS_URL = process.env.LIVEPIPE_NATS_URL ?? 'nats://127.0.0.1:4222';
const server = new URL(NATS_URL);
const unavailable = await unreachable('NATS', server.hostname, Number(server.port || 4222));

// The stream the JetStream conformance run creates through the driver. Its subjects are the
// suite's topics (conf.…) and the ordinary web-app topics the suite expects to be representable.
const STREAM = `livepipe_test_${process.pid}`;
const STREAM_SUBJECTS = ['*', 'conf.>', 'orders.>'];
const JS_URL = `${NATS_URL}?jetstream=${STREAM}&subjects=${encodeURIComponent(STREAM_SUBJECTS.join(','))}`;

// The broker's own client, used directly: a connection that knows nothing of the driver.
let raw: NatsConnection | undefined;
async function client(): Promise<NatsConnection> {
  raw ??= await connect({ servers: server.host, maxReconnectAttempts: -1 });
  return raw;
}
after(async () => {
  if (raw === undefined) return;
  await (await jetstreamManager(raw)).streams.delete(STREAM).catch(() => {});
  await raw.close();
});

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

const openNats = (url = NATS_URL): Promise<NatsBroker> => openDriver(url, NatsBroker);

const coreUnrepresentable = ['a b', 'orders.*', '*', '>', 'orders.>', 'a*b', 'a>', '.a', 'a.', 'a..b'];

describeConformance({
  name: 'nats (core)',
  unavailable,
  open: () => openNats(),
  async publishExternally(topic, body) {
    const nc = await client();
    nc.publish(topic, body);
    await nc.flush();
  },
  unrepresentableTopics: coreUnrepresentable,
  // No monitoring endpoint here: ask the server instead whether anyone still listens on the
  // topics. A request to a subject without subscribers fails at once with "no responders"; one
  // that reaches the closed driver's subscription would time out instead.
  async leftovers(_closed, topics) {
    const nc = await client();
    const left: string[] = [];
    for (const topic of topics) {
      try {
        await nc.request(topic, 'probe', { timeout: 1000 });
        left.push(`${topic} (answered)`);
      } catch (err) {
        if (!(err instanceof errors.RequestError && err.isNoResponders())) left.push(`subscription on ${topic} (${(err as Error).message})`);
      }
    }
    return left;
  },
  restartServer: () => restartBroker('nats'),
});

async function streamConsumers(topics: string[]): Promise<string[]> {
  const jsm = await jetstreamManager(await client());
  const left: string[] = [];
  for await (const ci of jsm.consumers.list(STREAM)) {
    const filters = [ci.config.filter_subject, ...(ci.config.filter_subjects ?? [])];
    if (filters.some((f) => f !== undefined && topics.includes(f))) left.push(`consumer ${ci.name} on ${filters.join(',')}`);
  }
  return left;
}

describeConformance({
  name: 'nats (JetStream)',
  unavailable,
  async open() {
    return openNats(JS_URL);
  },
  async publishExternally(topic, body) {
    await jetstream(await client()).publish(topic, body);
  },
  unrepresentableTopics: [...coreUnrepresentable, 'outside.the.stream'],
  leftovers: (_closed, topics) => streamConsumers(topics),
  restartServer: () => restartBroker('nats'),
});

describe('nats driver', { skip: skipUnlessCi(unavailable) }, () => {
  let broker: Broker;
  before(async () => {
    broker = await openNats();
  });
  after(() => broker.close());

  it('accepts only literal subjects, and says which rule a topic breaks', async () => {
    assert.match(broker.topicProblem('a b') ?? '', /whitespace/);
    for (const t of ['*', 'a.*', 'a.>', 'a*b', 'x>y']) assert.match(broker.topicProblem(t) ?? '', /\* or >.*wildcards/, t);
    for (const t of ['.a', 'a.', 'a..b']) assert.match(broker.topicProblem(t) ?? '', /empty tokens/, t);
    await assert.rejects(broker.subscribe('news.*', new Collector()), rejectsWith('invalid-topic', /news\.\*.*wildcards/));
    await assert.rejects(broker.publish('news.>', Buffer.from('x')), rejectsWith('invalid-topic', /wildcards/));
    for (const t of ['a-b_c', 'a.b.c', '$app.x', 'ä.ö', 'a/b', 'a:b']) assert.equal(broker.topicProblem(t), undefined, t);
  });

  it('delivers a subject with characters that are not wildcards to exactly its subscribers', async () => {
    const run = freshTopic('n');
    const c = new Collector();
    const sibling = new Collector();
    await broker.subscribe(`${run}.$x/é`, c);
    await broker.subscribe(`${run}.y`, sibling);
    (await client()).publish(`${run}.$x/é`, 'hit');
    await c.until(() => c.bodies.length === 1);
    await sleep(200);
    assert.deepEqual(c.texts(), ['hit']);
    assert.equal(sibling.bodies.length, 0);
  });

  it('rejects bad options with bad-request and a message naming them', async () => {
    await assert.rejects(openBroker(`${NATS_URL}?jetstrem=1`), rejectsWith('bad-request', /unknown nats:\/\/ option jetstrem \(known: jetstream, subjects\)/));
    await assert.rejects(openBroker(`${NATS_URL}?jetstream=no%20spaces`), rejectsWith('bad-request', /jetstream="no spaces".*letters, digits/));
    await assert.rejects(openBroker(`${NATS_URL}?subjects=a.%3E`), rejectsWith('bad-request', /subjects= applies only with jetstream/));
    const missing = `livepipe_missing_${process.pid}`;
    await assert.rejects(openBroker(`${NATS_URL}?jetstream=${missing}`), rejectsWith('bad-request', new RegExp(`stream ${missing} does not exist.*subjects=`)));
    await assert.rejects(openBroker(`${NATS_URL}?jetstream=${missing}&subjects=a..b`), rejectsWith('bad-request', new RegExp(`could not create JetStream stream ${missing} with subjects a\\.\\.b`)));
  });

  it('reports an unreachable server as broker-unavailable', async () => {
    await assert.rejects(openBroker('nats://127.0.0.1:1'), rejectsWith('broker-unavailable', /could not connect to NATS at 127\.0\.0\.1:1/));
  });
});

describe('nats driver in JetStream mode', { skip: skipUnlessCi(unavailable) }, () => {
  let broker: Broker;
  before(async () => {
    // A run that died before its after() left its stream, whose subjects would overlap ours.
    const jsm = await jetstreamManager(await client());
    for await (const stream of jsm.streams.list()) {
      const pid = Number(/^livepipe_test_(\d+)$/.exec(stream.config.name)?.[1]);
      if (pid > 0 && pid !== process.pid && !alive(pid)) await jsm.streams.delete(stream.config.name);
    }
    broker = await openNats(JS_URL);
  });
  after(() => broker.close());

  it('names the stream and its subjects when a topic lies outside them', async () => {
    assert.match(broker.topicProblem('a.b') ?? '', new RegExp(`subject of stream ${STREAM} \\(\\*, conf\\.>, orders\\.>\\)`));
    await assert.rejects(broker.subscribe('a.b', new Collector()), rejectsWith('invalid-topic', /a\.b.*subject of stream/));
    await assert.rejects(broker.publish('a.b', Buffer.from('x')), rejectsWith('invalid-topic', /subject of stream/));
  });

  it('replays what the stream holds after a position', async () => {
    await assertReplays(broker, freshTopic(), freshTopic());
  });

  it('starts at the subscription: messages the stream kept from before are not delivered', async () => {
    const topic = freshTopic();
    const js = jetstream(await client());
    await js.publish(topic, 'old');
    const c = new Collector();
    await broker.subscribe(topic, c);
    await js.publish(topic, 'new');
    await c.until(() => c.bodies.length === 1);
    await sleep(300);
    assert.deepEqual(c.texts(), ['new']);
  });

  it('recreates its consumer after a restart from where it was, even before any message (no history replay)', { timeout: 120_000 }, async () => {
    const topic = freshTopic();
    const js = jetstream(await client());
    const jsm = await jetstreamManager(await client());
    await js.publish(topic, 'old');
    const c = new Collector();
    await broker.subscribe(topic, c);
    await restartBroker('nats');
    await c.until(() => c.recoveries === 1, 60_000, 'recovery');
    assert.equal(c.errors.length, 1);
    // Publish once, when the test's own connection answers again: a request buffered during the
    // outage gets no reply, and a retried publish could store the message twice.
    const deadline = Date.now() + 30_000;
    while (!(await jsm.streams.info(STREAM).then(() => true, () => false))) assert.ok(Date.now() < deadline, 'JetStream answers the test client again');
    await js.publish(topic, 'new');
    await c.until(() => c.bodies.length >= 1);
    await sleep(300);
    assert.deepEqual(c.texts(), ['new']);
    assert.equal((await streamConsumers([topic])).length, 1, 'one consumer for the topic, the recreated one');
  });
});
