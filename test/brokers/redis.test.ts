import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Redis } from 'ioredis';
import { assertReplays, describeConformance, Collector, freshTopic, rejectsWith, sleep, openDriver } from './conformance.ts';
import { restartBroker, skipUnlessCi, unreachable } from './availability.ts';
import { openBroker } from '../../src/brokers/index.ts';
import type { Broker } from '../../src/brokers/broker.ts';
import { RedisBroker, streamPosition } from '../../src/brokers/redis.ts';

const REDIS_URL = process.env.LIVEPIPE_REDIS_URL ?? 'redis://127.0.0.1:6379';
const STREAMS_URL = `${REDIS_URL}?streams=1`;
const server = new URL(REDIS_URL);
const unavailable = await unreachable('Redis', server.hostname, Number(server.port || 6379));

// The broker's own client, used directly: a connection that knows nothing of the driver.
let raw: Redis | undefined;
function client(): Redis {
  if (raw === undefined) {
    raw = new Redis(REDIS_URL, { maxRetriesPerRequest: null });
    raw.on('error', () => {}); // reconnects on its own (the restart test stops the server)
  }
  return raw;
}
const streamKeys = new Set<string>();
after(async () => {
  if (raw === undefined) return;
  if (streamKeys.size > 0) await raw.del(...streamKeys);
  raw.disconnect();
});

const openRedis = (url = REDIS_URL): Promise<RedisBroker> => openDriver(url, RedisBroker);

/** The closed instance's connections, as CLIENT LIST names them (the server drops them shortly after the socket closes). */
async function connectionsOf(closed: Broker): Promise<string[]> {
  const name = (closed as RedisBroker).clientName;
  assert.match(name, /^livepipe-[0-9a-f]{12}$/);
  const deadline = Date.now() + 2000;
  for (;;) {
    const lines = String(await client().client('LIST')).split('\n').filter((l) => l.includes(` name=${name} `));
    if (lines.length === 0 || Date.now() > deadline) return lines.map((l) => `connection ${l.split(' ')[0]} named ${name}`);
    await sleep(50);
  }
}

describeConformance({
  name: 'redis (pub/sub)',
  unavailable,
  open: () => openRedis(),
  async publishExternally(topic, body) {
    await client().publish(topic, Buffer.from(body));
  },
  async leftovers(closed, topics) {
    const counts = (await client().pubsub('NUMSUB', ...topics)) as Array<string | number>;
    const channels = topics.filter((_, i) => Number(counts[2 * i + 1]) > 0).map((t) => `subscription to channel ${t}`);
    return [...channels, ...(await connectionsOf(closed))];
  },
  restartServer: () => restartBroker('redis'),
});

describeConformance({
  name: 'redis (streams)',
  unavailable,
  async open() {
    // Streams outlive the test; note the ones the suite publishes to through the driver, to delete them.
    const broker = await openRedis(STREAMS_URL);
    const publish = broker.publish.bind(broker);
    broker.publish = (topic, body) => {
      streamKeys.add(topic);
      return publish(topic, body);
    };
    return broker;
  },
  async publishExternally(topic, body) {
    streamKeys.add(topic);
    await client().xadd(topic, '*', 'body', Buffer.from(body));
  },
  // Subscribing creates nothing on the server but the reading connection.
  leftovers: (closed) => connectionsOf(closed),
  restartServer: () => restartBroker('redis'),
});

/** Kills `broker`'s connections on the server (a network drop, without restarting Redis). */
async function dropConnections(broker: RedisBroker): Promise<void> {
  const ids = String(await client().client('LIST')).split('\n').filter((l) => l.includes(` name=${broker.clientName} `)).map((l) => l.split(' ')[0]!.replace('id=', ''));
  assert.equal(ids.length, 2, `connections named ${broker.clientName}`);
  for (const id of ids) await client().client('KILL', 'ID', id);
}

describe('redis driver', { skip: skipUnlessCi(unavailable) }, () => {
  let broker: RedisBroker;
  before(async () => {
    broker = await openRedis();
  });
  after(() => broker.close());

  it('treats glob characters in a topic literally (SUBSCRIBE, never PSUBSCRIBE)', async () => {
    const run = freshTopic('r');
    assert.equal(broker.topicProblem(), undefined);
    const c = new Collector();
    await broker.subscribe(`${run}.*`, c);
    await client().publish(`${run}.x`, 'not for the glob');
    await client().publish(`${run}.*`, 'literal');
    await c.until(() => c.bodies.length === 1);
    await sleep(200);
    assert.deepEqual(c.texts(), ['literal']);
  });

  it('re-subscribes after the connection drops, reporting the outage once', async () => {
    const topic = freshTopic();
    const c = new Collector();
    await broker.subscribe(topic, c);
    await dropConnections(broker);
    await c.until(() => c.recoveries === 1, 15_000, 'recovery');
    assert.equal(c.errors.length, 1);
    assert.equal(c.errors[0]!.code, 'subscription-failure');
    assert.equal(c.errors[0]!.topic, topic);
    await client().publish(topic, 'after');
    await c.until(() => c.bodies.length === 1);
    assert.deepEqual(c.texts(), ['after']);
  });

  it('rejects bad options with bad-request and a message naming them', async () => {
    await assert.rejects(openBroker(`${REDIS_URL}?stream=1`), rejectsWith('bad-request', /unknown redis:\/\/ option stream \(known: streams, maxlen\)/));
    await assert.rejects(openBroker(`${REDIS_URL}?streams=yes`), rejectsWith('bad-request', /streams="yes": use 1 for Redis Streams or 0 for pub\/sub/));
    await assert.rejects(openBroker(`${REDIS_URL}?maxlen=5`), rejectsWith('bad-request', /maxlen applies only with streams=1/));
    for (const bad of ['0', '-1', '1.5', 'ten', '']) {
      await assert.rejects(openBroker(`${REDIS_URL}?streams=1&maxlen=${bad}`), rejectsWith('bad-request', /maxlen=.*a positive whole number/), bad);
    }
    await assert.rejects(openBroker('rediss://127.0.0.1:6379?x=1'), rejectsWith('bad-request', /unknown rediss:\/\/ option x/));
  });

  it('reports an unreachable server as broker-unavailable', async () => {
    await assert.rejects(openBroker('redis://127.0.0.1:1'), rejectsWith('broker-unavailable', /could not connect to Redis at 127\.0\.0\.1:1/));
  });
});

describe('redis driver in streams mode', { skip: skipUnlessCi(unavailable) }, () => {
  let broker: RedisBroker;
  before(async () => {
    broker = await openRedis(STREAMS_URL);
  });
  after(() => broker.close());

  it('starts after the last entry: what the stream held before subscribing is not delivered', async () => {
    const topic = freshTopic();
    streamKeys.add(topic);
    await client().xadd(topic, '*', 'body', 'old');
    const c = new Collector();
    await broker.subscribe(topic, c);
    await client().xadd(topic, '*', 'body', 'new');
    await c.until(() => c.bodies.length === 1);
    await sleep(300);
    assert.deepEqual(c.texts(), ['new']);
  });

  it('delivers the body field, and skips entries without one', async () => {
    const topic = freshTopic();
    streamKeys.add(topic);
    const c = new Collector();
    await broker.subscribe(topic, c);
    await client().xadd(topic, '*', 'other', 'x');
    await client().xadd(topic, '*', 'meta', 'm', 'body', 'kept');
    await c.until(() => c.bodies.length === 1);
    await sleep(300);
    assert.deepEqual(c.texts(), ['kept']);
  });

  it('refuses a key that holds another type, and drops one that becomes another type', async () => {
    const topic = freshTopic();
    streamKeys.add(topic);
    await client().set(topic, 'a string');
    await assert.rejects(broker.subscribe(topic, new Collector()), rejectsWith('subscription-failure', /holds a string, not a stream/));
    const changing = freshTopic();
    const ok = freshTopic();
    streamKeys.add(changing).add(ok);
    const lost = new Collector();
    const c = new Collector();
    await broker.subscribe(changing, lost);
    await broker.subscribe(ok, c);
    await client().set(changing, 'now a string');
    await lost.until(() => lost.errors.length === 1, 15_000, 'an error');
    assert.match(lost.errors[0]!.message, /now holds a string, not a stream/);
    // The other topics keep working.
    await broker.publish(ok, Buffer.from('fine'));
    await c.until(() => c.bodies.length === 1);
  });

  it('replays what the streams hold after a position, and says so when MAXLEN trimmed some', async () => {
    const [a, b] = [freshTopic(), freshTopic()];
    streamKeys.add(a).add(b);
    await assertReplays(broker, a, b);
    // Two streams' entries of one millisecond tie: the other stream's are replayed rather than lost.
    const [x, y] = [freshTopic(), freshTopic()];
    streamKeys.add(x).add(y);
    const ms = Date.now();
    await client().xadd(x, `${ms}-0`, 'body', 'x1');
    await client().xadd(y, `${ms}-0`, 'body', 'y1');
    await client().xadd(x, `${ms}-1`, 'body', 'x2');
    const tied = await broker.replay!([x, y], streamPosition(`${ms}-0`), 100, x);
    assert.deepEqual(tied.messages.map((m) => Buffer.from(m.body).toString()).sort(), ['x2', 'y1']);
    const small = await openRedis(`${REDIS_URL}?streams=1&maxlen=10`);
    try {
      const topic = freshTopic();
      streamKeys.add(topic);
      const c = new Collector();
      await small.subscribe(topic, c);
      await small.publish(topic, Buffer.from('first'));
      await c.until(() => c.bodies.length === 1);
      for (let i = 0; i < 200; i++) await small.publish(topic, Buffer.from(String(i)));
      const held = await small.replay!([topic], c.positions[0]!, 1000);
      assert.equal(held.complete, false);
      assert.ok(held.messages.length < 200, `${held.messages.length} entries held`);
    } finally {
      await small.close();
    }
  });

  it('trims to about maxlen entries when publishing', async () => {
    const small = await openRedis(`${REDIS_URL}?streams=1&maxlen=10`);
    try {
      const topic = freshTopic();
      streamKeys.add(topic);
      for (let i = 0; i < 500; i++) await small.publish(topic, Buffer.from(String(i)));
      const length = await client().xlen(topic);
      assert.ok(length >= 10 && length < 500, `XLEN ${length}`);
    } finally {
      await small.close();
    }
  });

  it('resumes from its last entry after the connection drops: entries added meanwhile arrive', async () => {
    const topic = freshTopic();
    streamKeys.add(topic);
    const c = new Collector();
    await broker.subscribe(topic, c);
    await client().xadd(topic, '*', 'body', 'before');
    await c.until(() => c.bodies.length === 1);
    await dropConnections(broker);
    await client().xadd(topic, '*', 'body', 'during');
    await c.until(() => c.recoveries === 1, 15_000, 'recovery');
    assert.equal(c.errors.length, 1);
    await client().xadd(topic, '*', 'body', 'after');
    await c.until(() => c.bodies.length === 3);
    assert.deepEqual(c.texts(), ['before', 'during', 'after']);
  });
});
