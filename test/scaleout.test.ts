/**
 * Scale-out (src/scaleout/peers.ts), in one process: three relays on one mem:// bus stand for
 * three nodes behind a load balancer. Separate processes behind nginx, over real brokers, are in
 * test/scaleout-nodes.test.ts.
 */
import { describe, it, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { SignJWT } from 'jose';
import { createRelay, type RelayOptions } from '../src/index.ts';
import { openBroker } from '../src/brokers/index.ts';
import type { Broker } from '../src/brokers/broker.ts';
import type { Peers } from '../src/scaleout/peers.ts';
import { startRelay, SseReader, post, type RunningRelay } from './support/relay.ts';

const HEARTBEAT_MS = 50;
let running: RunningRelay[] = [];

async function nodes(count: number, options: Partial<RelayOptions> = {}): Promise<RunningRelay[]> {
  const broker = `mem://scaleout-${process.pid}-${Math.random()}`;
  const started: RunningRelay[] = [];
  for (let i = 0; i < count; i++) {
    started.push(await startRelay({ broker, publish: true, scaleOut: { heartbeatMs: HEARTBEAT_MS, requestTimeoutMs: 500 }, sessionTtlMs: 10_000, ...options }));
  }
  running.push(...started);
  // Each node has heard every other's heartbeat.
  await new Promise((resolve) => setTimeout(resolve, HEARTBEAT_MS * 2));
  return started;
}

afterEach(async () => {
  // Clients that went away do not come back: no waiting for other nodes to take their sessions.
  await Promise.all(running.map((r) => r.relay.close({ handOverMs: 0 }).then(() => r.close())));
  running = [];
});

async function open(node: RunningRelay, query: string, headers: Record<string, string> = {}): Promise<SseReader> {
  const s = await SseReader.open(`${node.base}/events${query}`, headers);
  assert.equal(s.response.statusCode, 200);
  await s.until(() => s.events.length >= 1, 5000, 'config');
  return s;
}

async function publish(node: RunningRelay, topic: string, body: string): Promise<void> {
  const res = await post(`${node.base}/publish?topic=${encodeURIComponent(topic)}`, body, { 'content-type': 'text/plain' });
  assert.equal(res.status, 204, JSON.stringify(res.body));
}

/** Closes the client's side and waits until its node has let the connection go. */
async function drop(node: RunningRelay, s: SseReader): Promise<void> {
  s.close();
  const deadline = Date.now() + 5000;
  while ((node.relay.stats().connections.sse ?? 0) > 0) {
    if (Date.now() > deadline) throw new Error('the node did not notice the disconnect');
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

const metrics = async (node: RunningRelay) => (await fetch(`${node.base}/metrics`)).text();

const payloads = (s: SseReader) => s.messages().map((m) => m.json.payload as string);

describe('scale-out: nodes over one broker', () => {
  it('applies update_subscriptions that lands on another node to the session where it lives', async () => {
    const [a, b, c] = await nodes(3);
    const s = await open(a!, '?topics=one');
    const id = s.config.session_id as string;
    const res = await post(`${b!.base}/update_subscriptions`, JSON.stringify({ session_id: id, add: ['two'], remove: ['one'] }));
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.deepEqual(res.body, { session_id: id, subscriptions: ['two'], failed: [] });
    await publish(c!, 'one', 'not any more');
    await publish(c!, 'two', 'hello');
    await s.until(() => s.messages().length >= 1, 5000, 'the message on the added topic');
    assert.deepEqual(payloads(s), ['hello']);
    // Errors come back from the owner as they are, status and code.
    const bad = await post(`${c!.base}/update_subscriptions`, JSON.stringify({ session_id: id, add: ['livepipe-control.all'] }));
    assert.equal(bad.status, 400);
    assert.equal(bad.body.error.code, 'invalid-topic');
    s.close();
  });

  it('resumes a session on another node with what the client missed, then keeps it there', async () => {
    const [a, b, c] = await nodes(3);
    const s = await open(a!, '?topics=news');
    const id = s.config.session_id as string;
    await publish(a!, 'news', 'first');
    await s.until(() => s.messages().length >= 1, 5000, 'first');
    const lastId = s.messages()[0]!.id!;
    await drop(a!, s);
    await publish(c!, 'news', 'while away');

    const again = await open(b!, '', { 'last-event-id': lastId });
    assert.equal(again.config.session_id, id);
    assert.equal(again.config.resumed, true);
    assert.deepEqual(again.config.subscriptions, ['news']);
    await again.until(() => again.messages().length >= 1, 5000, 'the replayed message');
    assert.deepEqual(payloads(again), ['while away']);
    assert.equal(again.errors().length, 0, 'nothing was lost');
    assert.equal(a!.relay.stats().sessions, 0, 'the old node gave the session away');
    assert.match(await metrics(b!), /^livepipe_scaleout_sessions_handed_over_total 1$/m);
    assert.match(await metrics(a!), /^livepipe_scaleout_sessions_given_total 1$/m);
    assert.match(await metrics(a!), /^livepipe_scaleout_nodes 2$/m);

    await publish(a!, 'news', 'live');
    await again.until(() => again.messages().length >= 2, 5000, 'a live message on the new node');
    // The new owner answers updates from anywhere, including the old node.
    const res = await post(`${a!.base}/update_subscriptions`, JSON.stringify({ session_id: id, add: ['sport'] }));
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.deepEqual(res.body.subscriptions, ['news', 'sport']);
    await publish(c!, 'sport', 'goal');
    await again.until(() => again.messages().length >= 3, 5000, 'the added topic on the new node');
    assert.deepEqual(payloads(again), ['while away', 'live', 'goal']);
    again.close();
  });

  it('restores the session of a node that left, with events-lost for the gap', async () => {
    const [a, b] = await nodes(2);
    const s = await open(a!, '?topics=x,y');
    const id = s.config.session_id as string;
    await post(`${b!.base}/update_subscriptions`, JSON.stringify({ session_id: id, add: ['z'] }));
    await publish(b!, 'x', 'one');
    await s.until(() => s.messages().length >= 1, 5000, 'one');
    const lastId = s.messages()[0]!.id!;
    // Gone without handing anything over (what a crash does, but saying goodbye).
    await a!.relay.close({ handOverMs: 0 });

    const again = await open(b!, '', { 'last-event-id': lastId });
    assert.equal(again.config.session_id, id);
    assert.equal(again.config.resumed, true);
    assert.deepEqual(again.config.subscriptions.sort(), ['x', 'y', 'z']);
    await again.until(() => again.errors().length >= 1, 5000, 'events-lost');
    assert.equal(again.errors()[0].code, 'events-lost');
    assert.match(await metrics(b!), /^livepipe_scaleout_sessions_restored_total 1$/m);
    await publish(b!, 'z', 'after');
    await again.until(() => again.messages().length >= 1, 5000, 'a message after the restore');
    assert.deepEqual(payloads(again), ['after']);
    again.close();
  });

  it('sends a late hand-over request on to the node that took the session meanwhile', async () => {
    const [a, b, c] = await nodes(3);
    const s = await open(a!, '?topics=race');
    const id = s.config.session_id as string;
    await drop(a!, s);
    const onB = await open(b!, `?session_id=${id}`);
    assert.equal(onB.config.resumed, true);
    // A request that left before the news of the move reached its sender (a client that reconnected twice at once).
    const bus = a!.relay.core.broker.control!;
    const replies: any[] = [];
    await bus.subscribe('livepipe-control.latecomer', { message: (body) => replies.push(JSON.parse(Buffer.from(body).toString())), error() {}, recovered() {} });
    await bus.publish(`livepipe-control.${id.slice(0, 8)}`, Buffer.from(JSON.stringify({ t: 'take', ref: 7, id, from: 'latecomer' })));
    const deadline = Date.now() + 5000;
    while (replies.length === 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
    assert.deepEqual(replies, [{ t: 'taken', ref: 7, movedTo: (b!.relay.core.peers as Peers).node, from: id.slice(0, 8) }]);
    // And a node that resumes it now gets it from where it lives.
    const onC = await open(c!, `?session_id=${id}`);
    assert.equal(onC.config.resumed, true);
    assert.equal(b!.relay.stats().sessions, 0);
    onB.close();
    onC.close();
  });

  it('lets a session go when another node restored it, thinking this one gone', async () => {
    // Slow heartbeats: nothing from A revives it in B's eyes during the test.
    const [a, b] = await nodes(2, { scaleOut: { heartbeatMs: 60_000, requestTimeoutMs: 500 } });
    const s = await open(a!, '?topics=split');
    const id = s.config.session_id as string;
    await drop(a!, s);
    // B hears a goodbye in A's name (as after a partition that made A look dead).
    await b!.relay.core.broker.control!.publish('livepipe-control.all', Buffer.from(JSON.stringify({ t: 'bye', from: id.slice(0, 8) })));
    const onB = await open(b!, `?session_id=${id}`);
    assert.equal(onB.config.resumed, true);
    assert.equal(onB.errors()[0]?.code, 'events-lost', 'restored from its record, not handed over');
    const deadline = Date.now() + 5000;
    while (a!.relay.stats().sessions > 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
    assert.equal(a!.relay.stats().sessions, 0, 'A let its copy go');
    // Updates reaching A now go to B, where the session lives.
    const res = await post(`${a!.base}/update_subscriptions`, JSON.stringify({ session_id: id, add: ['more'] }));
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.deepEqual(res.body.subscriptions, ['split', 'more']);
    onB.close();
  });

  it('hands its sessions to the nodes their clients reconnect to when it shuts down, losing nothing', async () => {
    const [a, b] = await nodes(2);
    const s = await open(a!, '?topics=deploy');
    await publish(a!, 'deploy', 'before');
    await s.until(() => s.messages().length >= 1, 5000, 'before');
    const lastId = s.messages()[0]!.id!;
    const closing = a!.relay.close({ reconnectDelayMs: 0, handOverMs: 5000 });
    await s.until(() => s.ended, 5000, 'the stream to end');
    await publish(b!, 'deploy', 'during the shutdown');

    const again = await open(b!, '', { 'last-event-id': lastId });
    assert.equal(again.config.resumed, true);
    await again.until(() => again.messages().length >= 1, 5000, 'the message published during the shutdown');
    assert.deepEqual(payloads(again), ['during the shutdown']);
    assert.deepEqual(again.errors(), []);
    await closing;
    again.close();
  });

  it('opens a new session for an id no node knows, and an update for it is unknown-session', async () => {
    const [a, b] = await nodes(2);
    const s = await open(a!, '?topics=t');
    const id = s.config.session_id as string;
    s.close();
    // Same node, other random bits.
    const unknown = `${id.slice(0, 8)}${'A'.repeat(22)}`;
    const res = await post(`${b!.base}/update_subscriptions`, JSON.stringify({ session_id: unknown, add: ['u'] }));
    assert.equal(res.status, 404);
    assert.equal(res.body.error.code, 'unknown-session');
    const fresh = await open(b!, `?topics=t&session_id=${unknown}`);
    assert.equal(fresh.config.resumed, false);
    assert.notEqual(fresh.config.session_id, unknown);
    fresh.close();
  });

  it('answers broker-unavailable when the node that holds a session does not answer', async () => {
    const [a, b] = await nodes(2, { sessionTtlMs: 0 });
    const s = await open(a!, '?topics=t');
    const id = s.config.session_id as string;
    // The owner keeps its session but leaves the other nodes (as if cut off from them).
    await a!.relay.core.peers!.close();
    const res = await post(`${b!.base}/update_subscriptions`, JSON.stringify({ session_id: id, add: ['u'] }));
    assert.equal(res.status, 503, JSON.stringify(res.body));
    assert.equal(res.body.error.code, 'broker-unavailable');
    s.close();
  });

  it('keeps a session to the identity that opened it, on every node', async () => {
    const secret = 'a-shared-secret-of-at-least-32-bytes!';
    const [a, b] = await nodes(2, { auth: { jwt: { secret } } });
    const bearer = async (sub: string, subscribe: string[]) => ({
      authorization: `Bearer ${await new SignJWT({ livepipe: { subscribe } }).setProtectedHeader({ alg: 'HS256' }).setSubject(sub).setExpirationTime('5m').sign(new TextEncoder().encode(secret))}`,
    });
    const alice = await bearer('alice', ['own.*']);
    const mallory = await bearer('mallory', ['*']);
    const s = await open(a!, '?topics=own.feed', alice);
    const id = s.config.session_id as string;
    const update = (headers: Record<string, string>, add: string[]) => post(`${b!.base}/update_subscriptions`, JSON.stringify({ session_id: id, add }), { 'content-type': 'application/json', ...headers });

    const stolen = await update(mallory, ['own.more']);
    assert.equal(stolen.status, 403, JSON.stringify(stolen.body));
    const hijack = await SseReader.open(`${b!.base}/events?session_id=${id}`, mallory);
    assert.equal(hijack.response.statusCode, 403);
    hijack.close();
    assert.equal(s.ended, false, "alice's stream is left alone");
    assert.equal(a!.relay.stats().sessions, 1, 'and her session stays where it was');
    // Her own grants are checked on the node the update reached.
    const denied = await update(alice, ['other.topic']);
    assert.equal(denied.status, 403);
    assert.equal(denied.body.error.topic, 'other.topic');
    const allowed = await update(alice, ['own.more']);
    assert.equal(allowed.status, 200, JSON.stringify(allowed.body));
    assert.deepEqual(allowed.body.subscriptions, ['own.feed', 'own.more']);
    s.close();
  });

  it('ignores malformed node-to-node messages and keeps working', async () => {
    const [a, b] = await nodes(2);
    const control = a!.relay.core.broker.control!;
    for (const junk of ['not json', '{"t":"take"}', '{"from":"x","t":"held","records":"nope"}', '{"from":"x","t":"unknown"}', '[]', 'null']) {
      await control.publish('livepipe-control.all', Buffer.from(junk));
    }
    const s = await open(a!, '?topics=still');
    const res = await post(`${b!.base}/update_subscriptions`, JSON.stringify({ session_id: s.config.session_id, add: ['working'] }));
    assert.equal(res.status, 200, JSON.stringify(res.body));
    s.close();
  });

  it('takes a handed-over message onto the stream only as one data line', async () => {
    const [b] = await nodes(1);
    const bus = b!.relay.core.broker.control!;
    // A node that answers hand-overs from the wire, with whatever envelope the test gives it.
    let asked = 0;
    const answer = (envelope: string) => async (body: Uint8Array) => {
      const take = JSON.parse(Buffer.from(body).toString());
      asked++;
      const reply = { t: 'taken', ref: take.ref, topics: ['t'], missed: [['t', envelope, Date.now()]], from: 'fakenode' };
      await bus.publish(`livepipe-control.${take.from}`, Buffer.from(JSON.stringify(reply)));
    };
    let respond = answer('{"topic":"t","payload":"x"}\nevent: injected');
    await bus.subscribe('livepipe-control.fakenode', { message: (body) => void respond(body), error() {}, recovered() {} });
    const alive = () => bus.publish('livepipe-control.all', Buffer.from(JSON.stringify({ t: 'beat', from: 'fakenode' })));
    await alive();

    const forged = await open(b!, `?topics=t&session_id=fakenode${'A'.repeat(22)}`);
    assert.equal(asked, 1, 'the node named in the id was asked');
    assert.equal(forged.config.resumed, false, 'a reply that would break the stream is not taken');
    assert.ok(!forged.raw.includes('injected'));
    forged.close();

    respond = answer('{"topic":"t","payload":"handed over"}');
    await alive();
    const taken = await open(b!, `?session_id=fakenode${'B'.repeat(22)}`);
    assert.equal(taken.config.resumed, true);
    await taken.until(() => taken.messages().length >= 1, 5000, 'the handed-over message');
    assert.deepEqual(payloads(taken), ['handed over']);
    taken.close();
  });

  it('keeps the control topics to itself', async () => {
    const [a] = await nodes(1);
    const res = await SseReader.open(`${a!.base}/events?topics=livepipe-control.all`);
    assert.equal(res.response.statusCode, 400);
    res.close();
    const pub = await post(`${a!.base}/publish?topic=livepipe-control.all`, 'x', { 'content-type': 'text/plain' });
    assert.equal(pub.status, 400);
    assert.equal(pub.body.error.code, 'invalid-topic');
  });

  it('refuses to start on a broker whose readers compete for messages', async () => {
    const broker: Broker = {
      scheme: 'awssqs',
      competingReaders: true,
      topicProblem: () => undefined,
      subscribe: () => Promise.reject(new Error('unused')),
      publish: () => Promise.resolve(),
      isConnected: () => true,
      close: () => Promise.resolve(),
    };
    await assert.rejects(createRelay({ broker, scaleOut: true }), /scale-out needs a broker that gives every node each message; awssqs:\/\/ splits them/);
  });

  it('carries node-to-node messages on one shared topic where the broker has no plain publish/subscribe', async () => {
    const bus = await openBroker(`mem://shared-${process.pid}-${Math.random()}`);
    // The same bus seen through a driver without a control bus of its own (as Kafka's).
    const withoutControl = (): Broker => ({
      scheme: 'mem',
      topicProblem: (t) => bus.topicProblem(t),
      subscribe: (t, l) => bus.subscribe(t, l),
      publish: (t, b) => bus.publish(t, b),
      isConnected: () => bus.isConnected(),
      close: async () => {},
    });
    const seen: string[] = [];
    await bus.subscribe('livepipe-control', { message: (b) => seen.push(Buffer.from(b).toString().split('\n')[0]!), error() {}, recovered() {} });
    const [a, b] = await Promise.all([0, 1].map(() => startRelay({ broker: withoutControl(), publish: true, scaleOut: { heartbeatMs: HEARTBEAT_MS, requestTimeoutMs: 500 } })));
    running.push(a!, b!);
    await new Promise((resolve) => setTimeout(resolve, HEARTBEAT_MS * 2));
    const s = await open(a!, '?topics=t');
    const res = await post(`${b!.base}/update_subscriptions`, JSON.stringify({ session_id: s.config.session_id, add: ['u'] }));
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.deepEqual(res.body.subscriptions, ['t', 'u']);
    assert.ok(seen.includes(`livepipe-control.${(s.config.session_id as string).slice(0, 8)}`), 'the update went to its node on the shared topic');
    const reserved = await post(`${a!.base}/publish?topic=livepipe-control`, 'x', { 'content-type': 'text/plain' });
    assert.equal(reserved.body.error.code, 'invalid-topic');
    s.close();
    await bus.close();
  });
});
