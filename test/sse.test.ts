/** PROTOCOL.md section 2.1: the SSE stream of `GET /events`, against a real relay over real sockets. */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { MemBroker, type BrokerSubscription, type SubscriptionListener } from '../src/index.ts';
import { startRelay, SseReader, post, type RunningRelay } from './support/relay.ts';

/** Polls `predicate` until it holds; for state that no stream event announces (stats, broker topics). */
async function eventually(predicate: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

let counter = 0;
/** A topic no other test uses, so tests sharing a relay do not see each other's messages. */
function freshTopic(name: string): string {
  return `${name}-${++counter}`;
}

describe('GET /events (smoke)', () => {
  let r: RunningRelay;
  before(async () => {
    r = await startRelay();
  });
  after(() => r.close());

  it('sends config first, then messages with ids, and follows update_subscriptions', async () => {
    const s = await SseReader.open(`${r.base}/events?topics=a`);
    await s.until(() => s.events.length >= 1);
    assert.equal(s.response.headers['content-type'], 'text/event-stream; charset=utf-8');
    const sid = s.config.session_id;
    assert.deepEqual(s.config.subscriptions, ['a']);
    assert.equal((await post(`${r.base}/publish?topic=a`, 'one', {})).status, 204);
    const up = await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sid, add: ['b'], remove: ['a'] }));
    assert.equal(up.status, 200);
    assert.deepEqual(up.body, { session_id: sid, subscriptions: ['b'], failed: [] });
    await post(`${r.base}/publish?topic=a`, 'not for me', {});
    await post(`${r.base}/publish?topic=b`, 'two', {});
    await s.until(() => s.messages().length >= 2);
    assert.deepEqual(s.messages().map((e) => e.json), [{ topic: 'a', payload: 'one' }, { topic: 'b', payload: 'two' }]);
    assert.ok(s.messages().every((e) => e.id?.startsWith(`${sid}.`)));
    s.close();
  });
});

describe('GET /events', () => {
  let r: RunningRelay;
  before(async () => {
    r = await startRelay({ heartbeatMs: 100, sessionTtlMs: 5000, retryMs: 1234 });
  });
  after(() => r.close());

  it('answers with the SSE headers of section 2', async () => {
    const s = await SseReader.open(`${r.base}/events?topics=${freshTopic('h')}`);
    assert.equal(s.response.statusCode, 200);
    assert.equal(s.response.headers['content-type'], 'text/event-stream; charset=utf-8');
    assert.equal(s.response.headers['cache-control'], 'no-cache, no-transform');
    assert.equal(s.response.headers['x-accel-buffering'], 'no');
    s.close();
  });

  it('starts with a retry line, then the config event carrying the session', async () => {
    const a = freshTopic('a');
    const b = freshTopic('b');
    const s = await SseReader.open(`${r.base}/events?topics=${a},${b}`);
    await s.until(() => s.events.length >= 1, 5000, 'config');
    assert.match(s.raw, /^retry: 1234\n/);
    assert.equal(s.retry, 1234);
    const config = s.events[0]!;
    assert.equal(config.json.topic, '/httpsub/config');
    assert.match(config.json.payload.session_id, /^[A-Za-z0-9_-]{22}$/, '128 random bits in base64url');
    assert.deepEqual(config.json.payload, {
      session_id: config.json.payload.session_id,
      subscriptions: [a, b],
      resumed: false,
      heartbeat_ms: 100,
      session_ttl_ms: 5000,
    });
    assert.ok(config.id, 'the config event carries the resume position');

    // Every connection is a new session with its own id.
    const other = await SseReader.open(`${r.base}/events?topics=${a}`);
    await other.until(() => other.events.length >= 1);
    assert.notEqual(other.config.session_id, config.json.payload.session_id);
    s.close();
    other.close();
  });

  it('sends each message as {"topic","payload"} with an id, UTF-8 text exactly as published', async () => {
    const t = freshTopic('m');
    const s = await SseReader.open(`${r.base}/events?topics=${t}`);
    await s.until(() => s.events.length >= 1);
    const bodies = ['plain', 'héllo ✓ 🚀', 'two\nlines\r\nand "quotes" and \\ and \u2028', '{"looks":"like json"}', ''];
    for (const body of bodies) assert.equal((await post(`${r.base}/publish?topic=${t}`, body, {})).status, 204);
    await s.until(() => s.messages().length >= bodies.length, 5000, 'messages');
    assert.deepEqual(s.messages().map((e) => e.json), bodies.map((payload) => ({ topic: t, payload })));
    const ids = s.messages().map((e) => e.id);
    assert.ok(ids.every((id) => id?.startsWith(`${s.config.session_id}.`)), 'every message has an id naming its session');
    assert.equal(new Set(ids).size, ids.length, 'ids are distinct');
    s.close();
  });

  it('sends bodies that are not valid UTF-8 as payload_base64, byte for byte', async () => {
    const t = freshTopic('bin');
    const s = await SseReader.open(`${r.base}/events?topics=${t}`);
    await s.until(() => s.events.length >= 1);
    const body = Buffer.from([0xff, 0xfe, 0x00, 0x41, 0xc3, 0x28, 0x80, 0x0a, 0xed, 0xa0, 0x80]);
    assert.equal((await post(`${r.base}/publish?topic=${t}`, body, { 'content-type': 'application/octet-stream' })).status, 204);
    await s.until(() => s.messages().length >= 1);
    const event = s.messages()[0]!;
    assert.deepEqual(Object.keys(event.json).sort(), ['payload_base64', 'topic']);
    assert.equal(event.json.topic, t);
    assert.deepEqual(Buffer.from(event.json.payload_base64, 'base64'), body);
    assert.ok(event.id);
    s.close();
  });

  it('accepts an empty topics= as a session with no topics, which can subscribe later', async () => {
    const t = freshTopic('later');
    for (const query of ['?topics=', '']) {
      const s = await SseReader.open(`${r.base}/events${query}`);
      assert.equal(s.response.statusCode, 200);
      await s.until(() => s.events.length >= 1);
      assert.deepEqual(s.config.subscriptions, []);
      const up = await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: s.config.session_id, add: [t] }));
      assert.deepEqual(up.body.subscriptions, [t]);
      await r.relay.publish(t, 'hi');
      await s.until(() => s.messages().length >= 1);
      assert.deepEqual(s.messages()[0]!.json, { topic: t, payload: 'hi' });
      s.close();
    }
  });

  it('rejects invalid topics with 400 invalid-topic JSON before any stream, creating no session', async () => {
    const sessions = r.relay.stats().sessions;
    const bad = ['a%01b', 'a%7Fb', 'a,,b', 'x'.repeat(257), 'é'.repeat(129), '/httpsub/x', '/livepipe/x', 'ok,/livepipe/y'];
    for (const topics of bad) {
      const res = await fetch(`${r.base}/events?topics=${topics}`, { headers: { accept: 'text/event-stream' } });
      assert.equal(res.status, 400, topics);
      assert.match(res.headers.get('content-type') ?? '', /^application\/json/);
      const body = (await res.json()) as { error: { code: string; message: string } };
      assert.equal(body.error.code, 'invalid-topic', topics);
      assert.ok(body.error.message.length > 0);
    }
    assert.equal(r.relay.stats().sessions, sessions);

    // The limits themselves are fine: 256 bytes, and non-ASCII text.
    const longest = `${'x'.repeat(250)}${++counter}`.padEnd(256, 'y');
    const s = await SseReader.open(`${r.base}/events?topics=${longest},${encodeURIComponent(`é ✓-${++counter}`)}`);
    assert.equal(s.response.statusCode, 200);
    await s.until(() => s.events.length >= 1);
    assert.deepEqual(s.config.subscriptions, [longest, `é ✓-${counter}`]);
    s.close();
  });

  it('keeps per-topic order over 500 messages on interleaved topics', async () => {
    const [x, y] = [freshTopic('ox'), freshTopic('oy')];
    const s = await SseReader.open(`${r.base}/events?topics=${x},${y}`);
    await s.until(() => s.events.length >= 1);
    const publishes: Promise<void>[] = [];
    for (let i = 0; i < 500; i++) publishes.push(r.relay.publish(i % 3 === 0 ? y : x, String(i)));
    await Promise.all(publishes);
    await s.until(() => s.messages().length >= 500, 10_000, '500 messages');
    for (const topic of [x, y]) {
      const got = s.messages().filter((e) => e.json.topic === topic).map((e) => Number(e.json.payload));
      const expected = [...Array(500).keys()].filter((i) => (i % 3 === 0) === (topic === y));
      assert.deepEqual(got, expected, topic);
    }
    s.close();
  });

  it('delivers the same message to every session on the topic, each with its own id', async () => {
    const t = freshTopic('fan');
    const readers = await Promise.all([...Array(20)].map(() => SseReader.open(`${r.base}/events?topics=${t}`)));
    await Promise.all(readers.map((s) => s.until(() => s.events.length >= 1)));
    await r.relay.publish(t, 'to all');
    await Promise.all(readers.map((s) => s.until(() => s.messages().length >= 1)));
    for (const s of readers) {
      assert.deepEqual(s.messages().map((e) => e.json), [{ topic: t, payload: 'to all' }]);
      assert.ok(s.messages()[0]!.id?.startsWith(`${s.config.session_id}.`));
      s.close();
    }
    assert.equal(new Set(readers.map((s) => s.config.session_id)).size, readers.length);
  });

  it('sends a heartbeat comment when nothing else is sent', async () => {
    const s = await SseReader.open(`${r.base}/events?topics=${freshTopic('quiet')}`);
    await s.until(() => s.comments.length >= 2, 5000, 'two heartbeats');
    // Comments are not events: the stream still holds only the config event.
    assert.equal(s.events.length, 1);
    assert.match(s.raw, /\n:[^\n]*\n/);
    s.close();
  });
});

describe('GET /events with embedJsonPayloads', () => {
  let r: RunningRelay;
  before(async () => {
    r = await startRelay({ embedJsonPayloads: true });
  });
  after(() => r.close());

  it('embeds bodies that are JSON as values, on one data line, and leaves the rest as strings', async () => {
    const s = await SseReader.open(`${r.base}/events?topics=j`);
    await s.until(() => s.events.length >= 1);
    const bodies: Array<string | Buffer> = ['{"a":1,"b":[true,null,"x"]}', ' {\n  "pretty": "printed"\n}\n', '42', 'not json', '{broken', Buffer.from([0xff, 0x01])];
    for (const body of bodies) await r.relay.publish('j', body);
    await s.until(() => s.messages().length >= bodies.length);
    assert.deepEqual(
      s.messages().map((e) => e.json),
      [
        { topic: 'j', payload: { a: 1, b: [true, null, 'x'] } },
        { topic: 'j', payload: { pretty: 'printed' } },
        { topic: 'j', payload: 42 },
        { topic: 'j', payload: 'not json' },
        { topic: 'j', payload: '{broken' },
        { topic: 'j', payload_base64: Buffer.from([0xff, 0x01]).toString('base64') },
      ],
    );
    s.close();
  });
});

describe('GET /events and the broker', () => {
  it('reports a broker outage as subscription-failure, then events-lost on recovery, and keeps streaming', async () => {
    const broker = new MemBroker(`outage-${process.pid}-${Math.random()}`);
    const r = await startRelay({ broker });
    try {
      const s = await SseReader.open(`${r.base}/events?topics=a,b`);
      await s.until(() => s.events.length >= 1);
      broker.beginOutage();
      await s.until(() => s.errors().length >= 2, 5000, 'subscription-failure for both topics');
      assert.deepEqual(s.errors().map((e) => [e.code, e.topic]).sort(), [['subscription-failure', 'a'], ['subscription-failure', 'b']]);
      assert.ok(s.errors().every((e) => typeof e.message === 'string' && e.message.length > 0));
      assert.equal((await fetch(`${r.base}/readyz`)).status, 503);

      // A topic asked for during the outage fails on its own stream; the session still opens.
      const late = await SseReader.open(`${r.base}/events?topics=c`);
      assert.equal(late.response.statusCode, 200);
      await late.until(() => late.errors().length >= 1, 5000, 'subscription-failure for c');
      assert.deepEqual(late.config.subscriptions, []);
      assert.equal(late.errors()[0].code, 'subscription-failure');
      assert.equal(late.errors()[0].topic, 'c');
      late.close();

      broker.endOutage();
      await s.until(() => s.errors().length >= 4, 5000, 'events-lost for both topics');
      assert.deepEqual(s.errors().slice(2).map((e) => [e.code, e.topic]).sort(), [['events-lost', 'a'], ['events-lost', 'b']]);
      assert.equal((await fetch(`${r.base}/readyz`)).status, 200);
      await r.relay.publish('a', 'after');
      await s.until(() => s.messages().length >= 1);
      assert.deepEqual(s.messages().map((e) => e.json), [{ topic: 'a', payload: 'after' }]);
      s.close();
    } finally {
      await r.close();
      await broker.close();
    }
  });

  it('holds one broker subscription per topic whatever the number of sessions, and releases it after the last', async () => {
    const broker = new MemBroker(`refcount-${process.pid}-${Math.random()}`);
    // Count what reaches the broker itself.
    const subscribed: string[] = [];
    const closed: string[] = [];
    const subscribe = broker.subscribe.bind(broker);
    broker.subscribe = async (topic: string, listener: SubscriptionListener): Promise<BrokerSubscription> => {
      subscribed.push(topic);
      const sub = await subscribe(topic, listener);
      return { close: async () => (closed.push(topic), sub.close()) };
    };
    const r = await startRelay({ broker, sessionTtlMs: 50, topicGraceMs: 50 });
    try {
      const readers = await Promise.all([...Array(10)].map((_, i) => SseReader.open(`${r.base}/events?topics=shared,own${i}`)));
      await Promise.all(readers.map((s) => s.until(() => s.events.length >= 1)));
      assert.equal(subscribed.filter((t) => t === 'shared').length, 1);
      assert.equal(subscribed.length, 11);
      assert.equal(r.relay.stats().topics, 11);
      assert.ok(broker.activeTopics().includes('shared'));

      // Half leave: the shared subscription stays for the others.
      for (const s of readers.slice(0, 5)) s.close();
      await eventually(() => closed.length === 5, 'the leavers’ own topics to be released');
      assert.ok(!closed.includes('shared'));
      await r.relay.publish('shared', 'still here');
      await Promise.all(readers.slice(5).map((s) => s.until(() => s.messages().length >= 1)));

      for (const s of readers.slice(5)) s.close();
      await eventually(() => r.relay.stats().topics === 0, 'every topic to be released');
      assert.equal(r.relay.stats().sessions, 0);
      assert.deepEqual(broker.activeTopics(), []);
      assert.deepEqual(closed.sort(), [...subscribed].sort(), 'each broker subscription closed once');
    } finally {
      await r.close();
      await broker.close();
    }
  });
});

describe('relay.close()', () => {
  it('ends open streams cleanly, turns /readyz to 503 and refuses new streams', async () => {
    const r = await startRelay();
    try {
      assert.equal((await fetch(`${r.base}/readyz`)).status, 200);
      const readers = await Promise.all([SseReader.open(`${r.base}/events?topics=a`), SseReader.open(`${r.base}/events`)]);
      await Promise.all(readers.map((s) => s.until(() => s.events.length >= 1)));
      const closing = r.relay.close();
      const ready = await fetch(`${r.base}/readyz`);
      assert.equal(ready.status, 503);
      assert.equal(((await ready.json()) as { draining: boolean }).draining, true);
      await closing;
      for (const s of readers) {
        await s.until(() => s.ended, 5000, 'the stream to end');
        assert.equal(s.response.complete, true, 'the response ended normally, not aborted');
      }
      const refused = await fetch(`${r.base}/events?topics=a`);
      assert.equal(refused.status, 503);
      assert.equal(((await refused.json()) as { error: { code: string } }).error.code, 'broker-unavailable');
    } finally {
      await r.close();
    }
  });
});

describe('relay.close() while a stream is opening', () => {
  it('ends a stream whose topics were still being subscribed when the relay closed, rather than leaving it open', async () => {
    // A broker that acknowledges subscriptions only when the test says so.
    const mem = new MemBroker(`gated-${process.pid}-${Math.random()}`);
    let acknowledge!: () => void;
    const acknowledged = new Promise<void>((resolve) => (acknowledge = resolve));
    let asked!: () => void;
    const subscribing = new Promise<void>((resolve) => (asked = resolve));
    const r = await startRelay({
      broker: {
        scheme: 'mem',
        topicProblem: () => undefined,
        subscribe: async (topic: string, listener: SubscriptionListener): Promise<BrokerSubscription> => {
          asked();
          await acknowledged;
          return mem.subscribe(topic, listener);
        },
        publish: (topic: string, body: Uint8Array) => mem.publish(topic, body),
        isConnected: () => mem.isConnected(),
        close: () => mem.close(),
      },
    });
    try {
      const opening = SseReader.open(`${r.base}/events?topics=a`);
      await subscribing;
      const closing = r.relay.close();
      acknowledge();
      await closing;
      const s = await opening;
      await s.until(() => s.ended, 5000, 'the stream to end');
      assert.deepEqual(r.relay.stats().connections, {});
      assert.equal(r.relay.stats().sessions, 0);
    } finally {
      await r.close();
      await mem.close();
    }
  });
});
