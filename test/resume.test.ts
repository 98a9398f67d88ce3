/** PROTOCOL.md section 2.2: sessions outlive their connection for the TTL and resume where the client was. */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startRelay, SseReader, post, type RunningRelay } from './support/relay.ts';

/** Polls `predicate` until it holds; for state that no stream event announces (stats). */
async function eventually(predicate: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

let counter = 0;
function freshTopic(name: string): string {
  return `${name}-${++counter}`;
}

async function open(r: RunningRelay, query: string, headers: Record<string, string> = {}): Promise<SseReader> {
  const s = await SseReader.open(`${r.base}/events${query}`, headers);
  assert.equal(s.response.statusCode, 200);
  await s.until(() => s.events.length >= 1, 5000, 'config');
  return s;
}

/** Closes the client side and waits until the relay has detached it, so later publishes can only reach the session's history. */
async function disconnect(r: RunningRelay, s: SseReader): Promise<void> {
  const before = r.relay.stats().connections.sse ?? 0;
  s.close();
  await eventually(() => (r.relay.stats().connections.sse ?? 0) < before, 'the relay to notice the disconnect');
}

async function subscribe(r: RunningRelay, sessionId: string, add: string[], remove: string[] = []): Promise<string[]> {
  const res = await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sessionId, add, remove }));
  assert.equal(res.status, 200);
  return res.body.subscriptions;
}

/**
 * Publishes a marker on `topic` and waits for it: everything published before it has then
 * arrived too, so a test can assert that nothing more came (per-topic order, one sequence).
 */
async function settle(r: RunningRelay, s: SseReader, topic: string): Promise<void> {
  const marker = `marker-${++counter}`;
  await r.relay.publish(topic, marker);
  await s.until(() => s.messages().some((e) => e.json.payload === marker), 5000, marker);
}

const payloads = (s: SseReader) => s.messages().map((e) => `${e.json.topic}:${e.json.payload}`);

describe('resume within the TTL', () => {
  let r: RunningRelay;
  before(async () => {
    r = await startRelay({ sessionTtlMs: 10_000 });
  });
  after(() => r.close());

  it('Last-Event-ID resumes the same session with its subscriptions and replays exactly what was missed, in order', async () => {
    const [a, b, c] = [freshTopic('a'), freshTopic('b'), freshTopic('c')];
    const first = await open(r, `?topics=${a}`);
    const sid = first.config.session_id;
    assert.deepEqual(await subscribe(r, sid, [b]), [a, b]);
    // Someone else holds c, so its messages exist but are not this session's.
    const bystander = await open(r, `?topics=${c}`);
    await r.relay.publish(a, '1');
    await r.relay.publish(b, '2');
    await first.until(() => first.messages().length >= 2);
    const lastId = first.messages().at(-1)!.id!;
    await disconnect(r, first);

    for (const [topic, body] of [[a, '3'], [c, 'not mine'], [b, '4'], [a, '5']] as const) await r.relay.publish(topic, body);

    const second = await open(r, `?topics=${a}`, { 'last-event-id': lastId });
    assert.deepEqual(second.config, { ...first.config, subscriptions: [a, b], resumed: true });
    await settle(r, second, a);
    assert.deepEqual(payloads(second).slice(0, -1), [`${a}:3`, `${b}:4`, `${a}:5`]);
    assert.equal(second.errors().length, 0);
    const ids = [...first.messages(), ...second.messages()].map((e) => e.id);
    assert.ok(ids.every((id) => id?.startsWith(`${sid}.`)));
    assert.equal(new Set(ids).size, ids.length, 'no event delivered twice');
    second.close();
    bystander.close();
  });

  it('session_id= in the query resumes too, replaying what was published while away', async () => {
    const [a, b] = [freshTopic('a'), freshTopic('b')];
    const first = await open(r, `?topics=${a}`);
    const sid = first.config.session_id;
    await subscribe(r, sid, [b], [a]);
    await r.relay.publish(b, 'seen');
    await first.until(() => first.messages().length >= 1);
    await disconnect(r, first);
    await r.relay.publish(b, 'missed');

    // The URL's topics are the original ones; the session's own subscriptions win.
    const second = await open(r, `?topics=${a}&session_id=${sid}`);
    assert.equal(second.config.session_id, sid);
    assert.equal(second.config.resumed, true);
    assert.deepEqual(second.config.subscriptions, [b]);
    await settle(r, second, b);
    assert.deepEqual(payloads(second).slice(0, -1), [`${b}:missed`]);
    second.close();
  });

  it('resuming from the config event id (no message seen yet) keeps the subscriptions and replays from there', async () => {
    const [a, b] = [freshTopic('a'), freshTopic('b')];
    const first = await open(r, `?topics=${a}`);
    const sid = first.config.session_id;
    await subscribe(r, sid, [b]);
    await disconnect(r, first);
    assert.equal(first.messages().length, 0);
    await r.relay.publish(b, 'x');
    await r.relay.publish(a, 'y');

    const second = await open(r, `?topics=${a}`, { 'last-event-id': first.events[0]!.id! });
    assert.equal(second.config.session_id, sid);
    assert.equal(second.config.resumed, true);
    assert.deepEqual(second.config.subscriptions, [a, b]);
    await settle(r, second, a);
    assert.deepEqual(payloads(second).slice(0, -1), [`${b}:x`, `${a}:y`]);
    second.close();
  });

  it('does not replay messages of a topic from before the session subscribed to it', async () => {
    const [a, b] = [freshTopic('a'), freshTopic('b')];
    const holder = await open(r, `?topics=${b}`); // keeps b's history alive
    const first = await open(r, `?topics=${a}`);
    const sid = first.config.session_id;
    await r.relay.publish(a, '1');
    await first.until(() => first.messages().length >= 1);
    const lastId = first.messages()[0]!.id!;
    await disconnect(r, first);

    await r.relay.publish(b, 'before subscribing');
    await subscribe(r, sid, [b]);
    await r.relay.publish(b, 'after subscribing');
    await r.relay.publish(a, '2');

    const second = await open(r, '', { 'last-event-id': lastId });
    assert.equal(second.config.resumed, true);
    await settle(r, second, a);
    assert.deepEqual(payloads(second).slice(0, -1), [`${b}:after subscribing`, `${a}:2`]);
    second.close();
    holder.close();
  });

  it('a second connection for the session takes over: the first stream ends', async () => {
    const a = freshTopic('a');
    const first = await open(r, `?topics=${a}`);
    const second = await open(r, '', { 'last-event-id': first.events[0]!.id! });
    assert.equal(second.config.session_id, first.config.session_id);
    assert.equal(second.config.resumed, true);
    await first.until(() => first.ended, 5000, 'the first stream to end');
    await r.relay.publish(a, 'only the second');
    await settle(r, second, a);
    assert.deepEqual(payloads(second).slice(0, -1), [`${a}:only the second`]);
    assert.equal(first.messages().length, 0);
    second.close();
  });

  it('a forged or garbage Last-Event-ID or session_id gets a new session, not an error', async () => {
    const a = freshTopic('a');
    const real = await open(r, `?topics=${a}`);
    const sid: string = real.config.session_id;
    const forged = [
      ['last-event-id', 'garbage'],
      ['last-event-id', '....'],
      ['last-event-id', `${sid.slice(0, -1)}${sid.endsWith('A') ? 'B' : 'A'}.1`],
      ['last-event-id', `${sid}.-1`],
      ['last-event-id', `${sid}x.0`],
      ['last-event-id', '\u00ff'.repeat(300)],
      ['session_id', 'nope'],
    ];
    for (const [kind, value] of forged) {
      const s = kind === 'session_id' ? await open(r, `?topics=${a}&session_id=${encodeURIComponent(value!)}`) : await open(r, `?topics=${a}`, { [kind!]: value! });
      assert.notEqual(s.config.session_id, sid, value);
      assert.equal(s.config.resumed, false, value);
      assert.deepEqual(s.config.subscriptions, [a]);
      s.close();
    }
    // The genuine session was not disturbed.
    assert.equal(real.ended, false);
    real.close();
  });
});

describe('resume limits', () => {
  it('after the TTL a reconnect gets a new session subscribed to the URL topics', async () => {
    const r = await startRelay({ sessionTtlMs: 50 });
    try {
      const first = await open(r, '?topics=a');
      const sid = first.config.session_id;
      await subscribe(r, sid, ['b'], ['a']);
      await disconnect(r, first);
      await eventually(() => r.relay.stats().sessions === 0, 'the session to expire');
      for (const [query, headers] of [['?topics=a', { 'last-event-id': first.events[0]!.id! }], [`?topics=a&session_id=${sid}`, {}]] as const) {
        const s = await open(r, query, headers);
        assert.notEqual(s.config.session_id, sid);
        assert.equal(s.config.resumed, false);
        assert.deepEqual(s.config.subscriptions, ['a']);
        s.close();
      }
      assert.equal((await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sid, add: ['c'] }))).status, 404);
    } finally {
      await r.close();
    }
  });

  it('the TTL counts from when the last connection closed, also after a takeover', async () => {
    const ttl = 1000;
    const r = await startRelay({ sessionTtlMs: ttl });
    try {
      const first = await open(r, '?topics=a');
      const second = await open(r, '', { 'last-event-id': first.events[0]!.id! });
      await first.until(() => first.ended);
      // The takeover was 0.6 TTL ago when the second closes; resume 0.7 TTL after that.
      await sleep(ttl * 0.6);
      await disconnect(r, second);
      await sleep(ttl * 0.7);
      const third = await open(r, '', { 'last-event-id': second.events[0]!.id! });
      assert.equal(third.config.resumed, true);
      assert.equal(third.config.session_id, first.config.session_id);
      third.close();
    } finally {
      await r.close();
    }
  });

  it('says events-lost before the replay when history no longer holds everything missed', async () => {
    const r = await startRelay({ history: { maxMessages: 3 } });
    try {
      const first = await open(r, '?topics=a');
      await r.relay.publish('a', '0');
      await first.until(() => first.messages().length >= 1);
      await disconnect(r, first);
      for (let i = 1; i <= 6; i++) await r.relay.publish('a', String(i));

      const second = await open(r, '?topics=a', { 'last-event-id': first.messages()[0]!.id! });
      assert.equal(second.config.resumed, true);
      await second.until(() => second.messages().length >= 3, 5000, 'the replay');
      assert.equal(second.events.length, 5, 'config, events-lost, three replayed');
      assert.equal(second.events[1]!.json.error.code, 'events-lost');
      assert.deepEqual(payloads(second), ['a:4', 'a:5', 'a:6']);

      // When history holds everything, there is no such error.
      const third = await open(r, '?topics=a', { 'last-event-id': second.messages()[1]!.id! });
      await settle(r, third, 'a');
      assert.equal(third.errors().length, 0);
      assert.deepEqual(payloads(third).slice(0, -1), ['a:6']);
      third.close();
    } finally {
      await r.close();
    }
  });
});
