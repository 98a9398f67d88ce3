import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { MemBroker, type Broker } from '../src/index.ts';
import { startRelay, SseReader, post, type RunningRelay } from './support/relay.ts';

// PROTOCOL.md sections 1 and 3: POST /update_subscriptions against a real relay over HTTP.

const FORM = { 'content-type': 'application/x-www-form-urlencoded' };

/** Opens a stream and waits for its config event. */
async function openStream(r: RunningRelay, topics = ''): Promise<{ s: SseReader; sid: string }> {
  const s = await SseReader.open(`${r.base}/events?topics=${encodeURIComponent(topics)}`);
  await s.until(() => s.events.length >= 1, 5000, 'config event');
  return { s, sid: s.config.session_id };
}

function update(r: RunningRelay, body: unknown, headers?: Record<string, string>) {
  return post(`${r.base}/update_subscriptions`, typeof body === 'string' ? body : JSON.stringify(body), headers);
}

async function publish(r: RunningRelay, topic: string, body: string): Promise<void> {
  assert.equal((await post(`${r.base}/publish?topic=${encodeURIComponent(topic)}`, body, {})).status, 204);
}

/** Asserts an error response of PROTOCOL.md section 3. */
function assertError(res: { status: number; body: any; headers: Headers }, status: number, code: string): void {
  assert.equal(res.status, status, `status for ${JSON.stringify(res.body)}`);
  assert.match(res.headers.get('content-type') ?? '', /^application\/json/);
  assert.equal(res.body?.error?.code, code, JSON.stringify(res.body));
  assert.equal(typeof res.body.error.message, 'string');
  assert.ok(res.body.error.message.length > 0);
}

/** The session's subscriptions, read through a no-op update. */
async function subscriptionsOf(r: RunningRelay, sid: string): Promise<string[]> {
  const res = await update(r, { session_id: sid });
  assert.equal(res.status, 200);
  return [...res.body.subscriptions].sort();
}

/** Publishes on `topics`, then on `sentinel` (which the stream holds); resolves to the topics that arrived before the sentinel. */
async function delivered(r: RunningRelay, s: SseReader, topics: string[], sentinel: string): Promise<string[]> {
  const start = s.messages().length;
  for (const t of topics) await publish(r, t, `to ${t}`);
  const mark = `sentinel ${Math.random()}`;
  await publish(r, sentinel, mark);
  await s.until(() => s.messages().some((m) => m.json.payload === mark), 5000, 'sentinel');
  // One stream delivers in publish order, so anything that was coming arrived before the sentinel.
  return s.messages().slice(start).map((m) => m.json.topic).slice(0, -1);
}

/** POSTs `chunks` over node:http: chunked transfer encoding (no content-length), and only the given headers. */
function rawPost(url: string, chunks: string[], headers: Record<string, string>): Promise<{ status: number; body: any }> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method: 'POST', headers }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (text += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) }));
    });
    req.on('error', reject);
    for (const c of chunks) req.write(c);
    req.end();
  });
}

describe('POST /update_subscriptions', () => {
  let r: RunningRelay;
  before(async () => {
    r = await startRelay({ maxBodyBytes: 1024, maxTopicsPerSession: 4, heartbeatMs: 60_000 });
  });
  after(() => r.close());

  it('adds and removes with a JSON body and answers session_id, subscriptions and failed', async () => {
    const { s, sid } = await openStream(r, 'a,b');
    const res = await update(r, { session_id: sid, add: ['c'], remove: ['a'] });
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /^application\/json/);
    assert.equal(res.body.session_id, sid);
    assert.deepEqual([...res.body.subscriptions].sort(), ['b', 'c']);
    assert.deepEqual(res.body.failed, []);
    assert.deepEqual(Object.keys(res.body).sort(), ['failed', 'session_id', 'subscriptions']);
    s.close();
  });

  it('delivers messages on an added topic and stops those of a removed one', async () => {
    const { s, sid } = await openStream(r, 'keep,old');
    assert.deepEqual(await delivered(r, s, ['old', 'new'], 'keep'), ['old']);
    assert.equal((await update(r, { session_id: sid, add: ['new'], remove: ['old'] })).status, 200);
    assert.deepEqual(await delivered(r, s, ['old', 'new'], 'keep'), ['new']);
    s.close();
  });

  it('accepts JSON sent as text/plain (a fetch string body), with no content type, with a charset and as +json', async () => {
    const { s, sid } = await openStream(r);
    const body = (topic: string) => JSON.stringify({ session_id: sid, add: [topic] });
    // fetch labels a string body text/plain;charset=UTF-8 on its own.
    const plain = await post(`${r.base}/update_subscriptions`, body('t-plain'), {});
    assert.equal(plain.status, 200, JSON.stringify(plain.body));
    // node:http sends no content-type unless told to.
    const none = await rawPost(`${r.base}/update_subscriptions`, [body('t-none')], {});
    assert.equal(none.status, 200, JSON.stringify(none.body));
    const charset = await update(r, body('t-charset'), { 'content-type': 'application/json; charset=utf-8' });
    assert.equal(charset.status, 200, JSON.stringify(charset.body));
    const plus = await update(r, body('t-plus'), { 'content-type': 'application/vnd.api+json' });
    assert.equal(plus.status, 200, JSON.stringify(plus.body));
    assert.deepEqual([...plus.body.subscriptions].sort(), ['t-charset', 't-none', 't-plain', 't-plus']);
    s.close();
  });

  it('accepts the form shape: session_id, sub_topics and unsub_topics, comma-separated', async () => {
    const { s, sid } = await openStream(r, 'a,b');
    const form = new URLSearchParams({ session_id: sid, sub_topics: 'c,d', unsub_topics: 'a,b' }).toString();
    const res = await update(r, form, FORM);
    assert.equal(res.status, 200);
    assert.deepEqual(res.body.failed, []);
    assert.deepEqual([...res.body.subscriptions].sort(), ['c', 'd']);
    const only = await update(r, new URLSearchParams({ session_id: sid, unsub_topics: 'c' }).toString(), { 'content-type': 'application/x-www-form-urlencoded; charset=UTF-8' });
    assert.equal(only.status, 200);
    assert.deepEqual(only.body.subscriptions, ['d']);
    assert.deepEqual(await delivered(r, s, ['a', 'c'], 'd'), []);
    s.close();
  });

  it('treats adding a held topic and removing an unheld one as no error', async () => {
    const { s, sid } = await openStream(r, 'a');
    const res = await update(r, { session_id: sid, add: ['a', 'a'], remove: ['never-held'] });
    assert.equal(res.status, 200);
    assert.deepEqual(res.body, { session_id: sid, subscriptions: ['a'], failed: [] });
    // Still subscribed exactly once: one publish, one message.
    await publish(r, 'a', 'once');
    await publish(r, 'a', 'twice');
    await s.until(() => s.messages().length >= 2);
    assert.deepEqual(s.messages().map((m) => m.json.payload), ['once', 'twice']);
    s.close();
  });

  describe('400 bad-request', () => {
    let sid: string;
    let s: SseReader;
    before(async () => {
      ({ s, sid } = await openStream(r, 'a'));
    });
    after(() => s.close());

    it('malformed JSON', async () => {
      assertError(await update(r, '{"session_id":', { 'content-type': 'application/json' }), 400, 'bad-request');
      assertError(await update(r, '', { 'content-type': 'application/json' }), 400, 'bad-request');
    });

    it('JSON that is not an object', async () => {
      for (const body of ['[]', 'null', '"a"', '42', `[${JSON.stringify({ session_id: sid })}]`]) {
        assertError(await update(r, body, { 'content-type': 'application/json' }), 400, 'bad-request');
      }
    });

    it('wrong types', async () => {
      const bodies = [
        { session_id: sid, add: 'a' },
        { session_id: sid, add: [1] },
        { session_id: sid, add: [['a']] },
        { session_id: sid, remove: 'a' },
        { session_id: sid, remove: [null] },
        { session_id: sid, add: null },
        { session_id: sid, add: { 0: 'a' } },
        { session_id: 42, add: ['a'] },
      ];
      for (const body of bodies) assertError(await update(r, body, { 'content-type': 'application/json' }), 400, 'bad-request');
    });

    it('missing session_id (JSON and form)', async () => {
      assertError(await update(r, { add: ['a'] }, { 'content-type': 'application/json' }), 400, 'bad-request');
      assertError(await update(r, { session_id: '', add: ['a'] }, { 'content-type': 'application/json' }), 400, 'bad-request');
      assertError(await update(r, 'sub_topics=a', FORM), 400, 'bad-request');
    });

    it('a JSON body sent as a form', async () => {
      assertError(await update(r, JSON.stringify({ session_id: sid, add: ['b'] }), FORM), 400, 'bad-request');
      assert.deepEqual(await subscriptionsOf(r, sid), ['a']);
    });
  });

  describe('400 invalid-topic (PROTOCOL.md section 1)', () => {
    let sid: string;
    let s: SseReader;
    before(async () => {
      ({ s, sid } = await openStream(r));
    });
    after(() => s.close());

    const euro = '€'; // 3 bytes of UTF-8, one UTF-16 unit
    const invalid: Array<[string, string]> = [
      ['empty', ''],
      ['257 ASCII bytes', 'a'.repeat(257)],
      ['257 bytes of multibyte UTF-8 (86 characters)', euro.repeat(85) + 'ab'],
      ['NUL', 'a\u0000b'],
      ['newline', 'a\nb'],
      ['U+001F', 'a\u001fb'],
      ['DEL U+007F', 'a\u007fb'],
      ['comma', 'a,b'],
      ['reserved /httpsub/', '/httpsub/config'],
      ['reserved /livepipe/', '/livepipe/x'],
      ['lone surrogate (not UTF-8)', 'a\ud800b'],
    ];
    for (const [rule, topic] of invalid) {
      it(`rejects ${rule} in add (JSON) and in remove`, async () => {
        const res = await update(r, { session_id: sid, add: ['ok', topic] });
        assertError(res, 400, 'invalid-topic');
        assert.equal(res.body.error.topic, topic);
        assertError(await update(r, { session_id: sid, remove: [topic] }), 400, 'invalid-topic');
      });
    }

    it('rejects an invalid topic in the form shape (an empty item between commas)', async () => {
      assertError(await update(r, new URLSearchParams({ session_id: sid, sub_topics: 'a,,b' }).toString(), FORM), 400, 'invalid-topic');
      assertError(await update(r, new URLSearchParams({ session_id: sid, sub_topics: '/livepipe/x' }).toString(), FORM), 400, 'invalid-topic');
    });

    it('accepts topics at the edges of the rules: exactly 256 bytes (ASCII and multibyte), /httpsub without its slash, non-ASCII', async () => {
      const edge = [euro.repeat(85) + 'a', 'a'.repeat(256), '/httpsub', 'livepipe/x', 'héllo wörld 🎉', 'a b/c:d.e*>#'];
      assert.equal(Buffer.byteLength(edge[0]!), 256);
      for (const topic of edge) {
        const res = await update(r, { session_id: sid, add: [topic], remove: edge.filter((t) => t !== topic) });
        assert.equal(res.status, 200, `${JSON.stringify(topic)}: ${JSON.stringify(res.body)}`);
        assert.deepEqual(res.body.subscriptions, [topic]);
      }
      assert.equal((await update(r, { session_id: sid, add: [edge[0]], remove: edge.slice(1) })).status, 200);
      // And the 256-byte multibyte topic really carries messages.
      await publish(r, edge[0]!, 'edge');
      await s.until(() => s.messages().length >= 1);
      assert.deepEqual(s.messages()[0]!.json, { topic: edge[0], payload: 'edge' });
      assert.equal((await update(r, { session_id: sid, remove: edge })).status, 200);
    });
  });

  it('relay.updateSubscriptions (the app\'s own call) refuses topics that break section 1, changing nothing', async () => {
    const { s, sid } = await openStream(r, 'a');
    for (const bad of ['x,y', '', '/httpsub/config', 'tab\there']) {
      await assert.rejects(r.relay.updateSubscriptions({ sessionId: sid, add: [bad], remove: ['a'] }), (err: any) => err.code === 'invalid-topic', JSON.stringify(bad));
    }
    assert.deepEqual(await subscriptionsOf(r, sid), ['a']);
    s.close();
  });

  it('404 unknown-session', async () => {
    assertError(await update(r, { session_id: 'no-such-session', add: ['a'] }), 404, 'unknown-session');
    assertError(await update(r, new URLSearchParams({ session_id: 'no-such-session', sub_topics: 'a' }).toString(), FORM), 404, 'unknown-session');
  });

  it('413 too-large, with a content-length and chunked without one', async () => {
    const { s, sid } = await openStream(r, 'a');
    const big = JSON.stringify({ session_id: sid, add: ['b'], pad: 'x'.repeat(2000) });
    assertError(await update(r, big, { 'content-type': 'application/json' }), 413, 'too-large');
    const chunks = [big.slice(0, 500), big.slice(500, 1000), big.slice(1000)];
    const chunked = await rawPost(`${r.base}/update_subscriptions`, chunks, { 'content-type': 'application/json' });
    assert.equal(chunked.status, 413);
    assert.equal(chunked.body.error.code, 'too-large');
    // A small chunked body is fine.
    const small = JSON.stringify({ session_id: sid, add: ['c'] });
    const ok = await rawPost(`${r.base}/update_subscriptions`, [small.slice(0, 10), small.slice(10)], { 'content-type': 'application/json' });
    assert.equal(ok.status, 200);
    assert.deepEqual([...ok.body.subscriptions].sort(), ['a', 'c']);
    s.close();
  });

  it('415 unsupported-media-type', async () => {
    const { s, sid } = await openStream(r, 'a');
    for (const type of ['application/xml', 'text/html', 'multipart/form-data; boundary=x']) {
      assertError(await update(r, { session_id: sid, add: ['b'] }, { 'content-type': type }), 415, 'unsupported-media-type');
    }
    assert.deepEqual(await subscriptionsOf(r, sid), ['a']);
    s.close();
  });

  it('429 too-many-topics at the per-session cap, counting removals in the same request', async () => {
    const { s, sid } = await openStream(r, 'a,b,c');
    assert.deepEqual((await update(r, { session_id: sid, add: ['d'] })).body.subscriptions, ['a', 'b', 'c', 'd']);
    const over = await update(r, { session_id: sid, add: ['e'] });
    assertError(over, 429, 'too-many-topics');
    // Swapping within the cap is fine, and re-adding a held topic does not count.
    const swap = await update(r, { session_id: sid, add: ['e', 'b'], remove: ['a'] });
    assert.equal(swap.status, 200);
    assert.deepEqual([...swap.body.subscriptions].sort(), ['b', 'c', 'd', 'e']);
    s.close();
  });

  describe('a rejected request changes nothing', () => {
    it('one invalid topic among valid ones in add, with a valid remove', async () => {
      const { s, sid } = await openStream(r, 'a,b');
      assertError(await update(r, { session_id: sid, add: ['c', 'd', 'bad,topic'], remove: ['a'] }), 400, 'invalid-topic');
      assertError(await update(r, { session_id: sid, add: ['c'], remove: ['a', '/httpsub/x'] }), 400, 'invalid-topic');
      assertError(await update(r, new URLSearchParams({ session_id: sid, sub_topics: 'c,', unsub_topics: 'a' }).toString(), FORM), 400, 'invalid-topic');
      assertError(await update(r, { session_id: sid, add: ['c', 7], remove: ['a'] }), 400, 'bad-request');
      assert.deepEqual(await delivered(r, s, ['a', 'c', 'd'], 'b'), ['a']);
      assert.deepEqual(await subscriptionsOf(r, sid), ['a', 'b']);
      s.close();
    });

    it('too many topics, with a valid remove', async () => {
      const { s, sid } = await openStream(r, 'a,b');
      assertError(await update(r, { session_id: sid, add: ['c', 'd', 'e', 'f'], remove: ['a'] }), 429, 'too-many-topics');
      assert.deepEqual(await delivered(r, s, ['a', 'c'], 'b'), ['a']);
      assert.deepEqual(await subscriptionsOf(r, sid), ['a', 'b']);
      s.close();
    });
  });

  it('serialises concurrent updates on one session: 20 at once all apply', async () => {
    // A broker that takes a few ms to acknowledge, as a real one does, so the updates overlap.
    const mem = new MemBroker(`slow-${process.pid}-${Math.random()}`);
    const slow: Broker = {
      scheme: 'mem',
      topicProblem: () => undefined,
      subscribe: async (topic, listener) => {
        await new Promise((resolve) => setTimeout(resolve, 2));
        return mem.subscribe(topic, listener);
      },
      publish: (topic, body) => mem.publish(topic, body),
      isConnected: () => mem.isConnected(),
      close: () => mem.close(),
    };
    const big = await startRelay({ broker: slow, maxTopicsPerSession: 100 });
    try {
      const { s, sid } = await openStream(big);
      const topics = Array.from({ length: 20 }, (_, i) => `c${i}`);
      const results = await Promise.all(topics.map((t) => update(big, { session_id: sid, add: [t] })));
      for (const res of results) assert.equal(res.status, 200);
      // Applied one after the other: each answer saw every earlier one, so the sizes are 1..20.
      assert.deepEqual(results.map((res) => res.body.subscriptions.length).sort((x, y) => x - y), topics.map((_, i) => i + 1));
      const res = await update(big, { session_id: sid });
      assert.deepEqual([...res.body.subscriptions].sort(), [...topics].sort());
      s.close();
    } finally {
      await big.close();
      await mem.close();
    }
  });
});

describe('POST /update_subscriptions racing the session TTL', () => {
  it('answers unknown-session to an update queued behind a slow one while the session expired, and subscribes nothing for it', async () => {
    // A broker that acknowledges subscriptions only when the test says so.
    const mem = new MemBroker(`gated-${process.pid}-${Math.random()}`);
    let acknowledge!: () => void;
    const acknowledged = new Promise<void>((resolve) => (acknowledge = resolve));
    let asked!: () => void;
    const subscribing = new Promise<void>((resolve) => (asked = resolve));
    const gated: Broker = {
      scheme: 'mem',
      topicProblem: () => undefined,
      subscribe: async (topic, listener) => {
        asked();
        await acknowledged;
        return mem.subscribe(topic, listener);
      },
      publish: (topic, body) => mem.publish(topic, body),
      isConnected: () => mem.isConnected(),
      close: () => mem.close(),
    };
    const r = await startRelay({ broker: gated, sessionTtlMs: 50, topicGraceMs: 0 });
    try {
      const { s, sid } = await openStream(r);
      const first = update(r, { session_id: sid, add: ['x'] });
      await subscribing;
      // Queued behind the first, which waits for the broker.
      const second = update(r, { session_id: sid, add: ['y'] });
      s.close();
      while (r.relay.stats().sessions > 0) await new Promise((resolve) => setTimeout(resolve, 10));
      acknowledge();
      await first;
      assertError(await second, 404, 'unknown-session');
      // Nothing holds a broker subscription for the expired session.
      while (r.relay.stats().topics > 0) await new Promise((resolve) => setTimeout(resolve, 10));
      assert.deepEqual(mem.activeTopics(), []);
    } finally {
      await r.close();
      await mem.close();
    }
  });
});

describe('POST /update_subscriptions with a failing broker', () => {
  let broker: MemBroker;
  let r: RunningRelay;
  before(async () => {
    broker = new MemBroker(`outage-${process.pid}-${Math.random()}`);
    r = await startRelay({ broker, heartbeatMs: 60_000 });
  });
  after(async () => {
    await r.close();
    await broker.close();
  });

  it('answers 200 with the topic in failed (not in subscriptions) and sends an error event on the stream', async () => {
    const { s, sid } = await openStream(r, 'a');
    broker.beginOutage();
    try {
      const res = await update(r, { session_id: sid, add: ['x'] });
      assert.equal(res.status, 200);
      assert.equal(res.body.session_id, sid);
      assert.deepEqual(res.body.subscriptions, ['a']);
      assert.equal(res.body.failed.length, 1);
      assert.equal(res.body.failed[0].topic, 'x');
      assert.equal(res.body.failed[0].code, 'subscription-failure');
      assert.equal(typeof res.body.failed[0].message, 'string');
      await s.until(() => s.errors().some((e) => e.topic === 'x'), 5000, 'error event for x');
      assert.equal(s.errors().find((e) => e.topic === 'x').code, 'subscription-failure');
    } finally {
      broker.endOutage();
    }
    // Once the broker is back, the same topic can be added and delivers.
    const retry = await update(r, { session_id: sid, add: ['x'] });
    assert.deepEqual(retry.body, { session_id: sid, subscriptions: ['a', 'x'], failed: [] });
    await publish(r, 'x', 'back');
    await s.until(() => s.messages().some((m) => m.json.payload === 'back'));
    s.close();
  });
});
