import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import { createServer, connect, type Socket } from 'node:net';
import { promisify } from 'node:util';
import * as amqplib from 'amqplib';
import type { ChannelModel, ConfirmChannel } from 'amqplib';
import { describeConformance, Collector, freshTopic, openDriver } from './conformance.ts';
import { restartBroker, skipUnlessCi, unreachable } from './availability.ts';
import { openBroker } from '../../src/brokers/index.ts';
import { AmqpBroker, parseAmqpUrl } from '../../src/brokers/amqp.ts';
import { RelayError } from '../../src/errors.ts';

const AMQP_URL = process.env.LIVEPIPE_AMQP_URL ?? 'amqp://guest:guest@127.0.0.1:5672';
const server = new URL(AMQP_URL);
const unavailable = await unreachable('RabbitMQ', server.hostname, Number(server.port || 5672));

// The broker's own client, used directly: a second connection that knows nothing of the driver.
// Opened again after it closes (the restart test stops the server).
let raw: Promise<{ conn: ChannelModel; channel: ConfirmChannel }> | undefined;
function client(): Promise<{ conn: ChannelModel; channel: ConfirmChannel }> {
  const opening = (raw ??= (async () => {
    const conn = await amqplib.connect(AMQP_URL);
    conn.on('error', () => {});
    conn.on('close', () => {
      if (raw === opening) raw = undefined;
    });
    const channel = await conn.createConfirmChannel();
    channel.on('error', () => {});
    channel.on('close', () => void conn.close().catch(() => {}));
    return { conn, channel };
  })());
  opening.catch(() => {
    if (raw === opening) raw = undefined; // try again next time
  });
  return opening;
}
/** Publishes with the broker's own client and waits for the broker's confirm. */
async function publishRaw(exchange: string, topic: string, body: Buffer, options: amqplib.Options.Publish = {}): Promise<void> {
  const { channel } = await client();
  channel.publish(exchange, topic, body, options);
  await channel.waitForConfirms();
}
after(async () => {
  const opened = await raw?.catch(() => undefined);
  await opened?.conn.close().catch(() => {});
});

const openAmqp = (url = AMQP_URL): Promise<AmqpBroker> => openDriver(url, AmqpBroker);

const run = promisify(execFile);
// Only an operator can delete another connection's exclusive queue: rabbitmqctl, as scripts/brokers.sh runs it.
const rabbitmqctl = (...args: string[]) => run('rabbitmqctl', ['-n', 'rabbit@localhost', ...args], { env: { ...process.env, HOME: '/var/lib/rabbitmq' }, timeout: 30_000 });
const noCtl = await rabbitmqctl('-q', 'status').then(() => undefined, () => 'rabbitmqctl cannot reach rabbit@localhost here');
const rejectsWith = (code: string, pattern: RegExp) => (err: unknown) => err instanceof RelayError && err.code === code && pattern.test(err.message);

describeConformance({
  name: 'amqp (RabbitMQ)',
  unavailable,
  open: () => openAmqp(),
  publishExternally: (topic, body) => publishRaw('livepipe', topic, Buffer.from(body)),
  unrepresentableTopics: ['x'.repeat(256), '*', '#', 'orders.*', 'orders.#.created', '#.b'],
  // The driver's queue is server-named; a passive declare from another connection finds it if it is still there.
  async leftovers(closed) {
    const queue = (closed as AmqpBroker).queueName;
    assert.match(queue, /^amq\.gen-/);
    // A failed passive declare closes its channel, so it gets one of its own.
    const probe = await (await client()).conn.createChannel();
    probe.on('error', () => {});
    try {
      await probe.checkQueue(queue);
      await probe.close();
      return [`queue ${queue}`];
    } catch (err) {
      // RESOURCE_LOCKED (405) would mean the queue still exists, held by the closed driver's connection.
      return (err as { code?: number }).code === 404 ? [] : [`queue ${queue} (${(err as Error).message})`];
    }
  },
  restartServer: () => restartBroker('rabbitmq'),
});

describe('amqp driver', { skip: skipUnlessCi(unavailable) }, () => {
  it('enforces the routing key rules: 255 bytes, no * or # words', { timeout: 30_000 }, async () => {
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
    assert.deepEqual(parse('amqp://h'), { exchange: 'livepipe', clientUrl: 'amqp://h', connectTimeoutMs: 10_000 });
    // amqplib takes the heartbeat and channelMax from the URL; the connect timeout is a socket option.
    assert.deepEqual(parse('rabbit://u:p@h:5673/vh?exchange=events.v1&heartbeat=30&channel_max=8&connection_timeout=2500'), {
      exchange: 'events.v1',
      clientUrl: 'amqp://u:p@h:5673/vh?heartbeat=30&channelMax=8',
      connectTimeoutMs: 2500,
    });
    assert.equal(parse('amqps://h?exchange=x').clientUrl, 'amqps://h');
    assert.throws(() => parse('amqp://h?exchange='), rejectsWith('bad-request', /exchange="" is not an exchange name/));
    assert.throws(() => parse('amqp://h?exchange=a%20b'), rejectsWith('bad-request', /exchange="a b"/));
    assert.throws(() => parse('amqp://h?heartbeat=soon'), rejectsWith('bad-request', /heartbeat="soon" must be a whole number/));
    assert.throws(() => parse('amqp://h?toString=1'), rejectsWith('bad-request', /unknown amqp:\/\/ option "toString"/));
    assert.throws(() => parse('amqp://h?exchnage=x'), rejectsWith('bad-request', /unknown amqp:\/\/ option "exchnage" \(known: exchange, heartbeat, channel_max, connection_timeout\)/));
  });

  it('uses the exchange named in the URL, under the rabbit:// scheme too', { timeout: 30_000 }, async () => {
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
      await (await client()).channel.deleteExchange(exchange);
    }
  });

  it('delivers the bodies of other publishers byte for byte, whatever their content-type', { timeout: 30_000 }, async () => {
    const broker = await openAmqp();
    try {
      const topic = freshTopic();
      const c = new Collector();
      await broker.subscribe(topic, c);
      // Odd whitespace and an integer beyond 2^53: a client that parses JSON bodies would change both.
      const json = Buffer.from('{"id": 12345678901234567890,  "x" : 1 }');
      const notUtf8 = Buffer.from([0x68, 0xc3, 0xa9, 0xff, 0xfe, 0xc3, 0x28, 0xed, 0xa0, 0x80, 0x0a]);
      await publishRaw('livepipe', topic, json, { contentType: 'application/json' });
      await publishRaw('livepipe', topic, notUtf8, { contentType: 'text/plain', contentEncoding: 'utf-8' });
      await c.until(() => c.bodies.length === 2, 5000, 'two messages');
      assert.deepEqual(c.bodies, [json, notUtf8]);
    } finally {
      await broker.close();
    }
  });

  it('confirms a burst of concurrent publishes, waiting out flow control, in order', { timeout: 30_000 }, async () => {
    const broker = await openAmqp();
    try {
      const topic = freshTopic();
      const c = new Collector();
      await broker.subscribe(topic, c);
      // Issued at once, these overfill amqplib's per-channel write buffer (about 2048 messages this
      // small), so the later ones wait for its 'drain', twice.
      const n = 5000;
      const body = (i: number) => Buffer.concat([Buffer.from(`${i}:`), Buffer.alloc(256, i % 256)]);
      await Promise.all(Array.from({ length: n }, (_, i) => broker.publish(topic, body(i))));
      await c.until(() => c.bodies.length === n, 20_000, `${n} messages`);
      for (let i = 0; i < n; i++) assert.ok(c.bodies[i]!.equals(body(i)), `message ${i} out of order or changed`);
    } finally {
      await broker.close();
    }
  });

  it('reports an outage once per subscription, fails fast while it lasts, then restores every binding', { timeout: 30_000 }, async () => {
    const proxy = await startProxy();
    const logs: string[] = [];
    const broker = await openBroker(proxy.url, { log: (_level, message) => logs.push(message) });
    const [t1, t2] = [freshTopic(), freshTopic()];
    const [c1, c1b, c2] = [new Collector(), new Collector(), new Collector()];
    try {
      await broker.subscribe(t1, c1);
      await broker.subscribe(t1, c1b);
      await broker.subscribe(t2, c2);
      proxy.cut();
      for (const c of [c1, c1b, c2]) await c.until(() => c.errors.length === 1, 10_000, 'the outage report');
      assert.equal(broker.isConnected(), false);
      await assert.rejects(broker.publish(t1, Buffer.from('lost')), rejectsWith('broker-unavailable', /not connected to RabbitMQ/));
      await assert.rejects(broker.subscribe(freshTopic(), new Collector()), rejectsWith('subscription-failure', /reconnecting/));
      // Several reconnect attempts fail while the network is down; each subscription still hears of it once.
      await c1.until(() => logs.filter((m) => /reconnect failed/.test(m)).length >= 2, 10_000, 'two failed reconnects');
      for (const c of [c1, c1b, c2]) {
        assert.deepEqual(c.errors.map((e) => [e.code, e.topic]), [['subscription-failure', c === c2 ? t2 : t1]]);
        assert.equal(c.recoveries, 0);
      }
      proxy.restore();
      for (const c of [c1, c1b, c2]) await c.until(() => c.recoveries === 1, 10_000, 'the recovery');
      assert.equal(broker.isConnected(), true);
      // The new queue has both bindings: a foreign publisher reaches every subscription.
      await publishRaw('livepipe', t1, Buffer.from('one'));
      await publishRaw('livepipe', t2, Buffer.from('two'));
      await broker.publish(t2, Buffer.from('three'));
      for (const c of [c1, c1b]) await c.until(() => c.bodies.length === 1, 5000, 'delivery on t1');
      await c2.until(() => c2.bodies.length === 2, 5000, 'delivery on t2');
      assert.deepEqual([c1.texts(), c1b.texts(), c2.texts()], [['one'], ['one'], ['two', 'three']]);
    } finally {
      await broker.close();
      await proxy.close();
    }
  });

  it('fails publishes fast while RabbitMQ blocks publishers, and publishes again once it unblocks', { timeout: 30_000 }, async () => {
    const proxy = await startProxy();
    const logs: string[] = [];
    const broker = await openBroker(proxy.url, { log: (_level, message) => logs.push(message) });
    try {
      const topic = freshTopic();
      const c = new Collector();
      await broker.subscribe(topic, c);
      // What RabbitMQ sends on a memory or disk alarm: connection.blocked, later connection.unblocked.
      proxy.toClients(connectionMethod(60, Buffer.from('\x0dlow on memory')));
      await c.until(() => logs.includes('RabbitMQ blocked publishing'), 5000, 'the blocked notice');
      await assert.rejects(broker.publish(topic, Buffer.from('held')), rejectsWith('broker-unavailable', /blocking publishers \(low on memory\)/));
      proxy.toClients(connectionMethod(61));
      await c.until(() => logs.includes('RabbitMQ unblocked publishing'), 5000, 'the unblocked notice');
      await broker.publish(topic, Buffer.from('flows'));
      await c.until(() => c.bodies.length === 1, 5000, 'the message after unblocking');
      assert.deepEqual(c.texts(), ['flows']);
      assert.deepEqual(c.errors, []); // delivery never stopped
    } finally {
      await broker.close();
      await proxy.close();
    }
  });

  it('rebuilds its exchange, queue and bindings when the exchange is deleted under it', { timeout: 30_000 }, async () => {
    const exchange = `livepipe-test-${randomBytes(4).toString('hex')}`;
    const broker = await openAmqp(`${AMQP_URL}?exchange=${exchange}`);
    try {
      const topic = freshTopic();
      const c = new Collector();
      await broker.subscribe(topic, c);
      await (await client()).channel.deleteExchange(exchange); // and every binding with it
      await assert.rejects(broker.publish(topic, Buffer.from('nowhere')), rejectsWith('broker-unavailable', /NOT_FOUND - no exchange/));
      await c.until(() => c.recoveries === 1, 10_000, 'an error and a recovery');
      assert.equal(c.errors[0]?.code, 'subscription-failure');
      await broker.publish(topic, Buffer.from('again'));
      await c.until(() => c.bodies.length === 1, 5000, 'delivery through the new binding');
      assert.deepEqual(c.texts(), ['again']);
    } finally {
      await broker.close();
      await (await client()).channel.deleteExchange(exchange);
    }
  });

  it('closes while reconnecting, and stops trying', { timeout: 30_000 }, async () => {
    const proxy = await startProxy();
    const broker = await openBroker(proxy.url);
    try {
      const c = new Collector();
      await broker.subscribe(freshTopic(), c);
      proxy.cut();
      await c.until(() => c.errors.length === 1, 10_000, 'the outage report');
      await broker.close();
      await broker.close(); // idempotent
      const attempts = proxy.connections;
      proxy.restore();
      await new Promise((r) => setTimeout(r, 500));
      assert.equal(proxy.connections, attempts, 'the closed driver connected again');
      assert.equal(c.recoveries, 0);
      assert.equal(broker.isConnected(), false);
    } finally {
      await broker.close();
      await proxy.close();
    }
  });

  it('reports a queue deleted by an operator and recovers with a new one', { skip: skipUnlessCi(noCtl), timeout: 30_000 }, async () => {
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

/** A TCP proxy to RabbitMQ that a test can cut (every connection reset, new ones refused) and restore. */
async function startProxy() {
  const sockets = new Set<Socket>();
  const clients = new Set<Socket>();
  let up = true;
  const proxy = {
    connections: 0,
    url: '',
    /** Writes bytes to every client as if RabbitMQ sent them (between frames: call it while the connection is idle). */
    toClients(bytes: Buffer) {
      for (const socket of clients) socket.write(bytes);
    },
    cut() {
      up = false;
      for (const socket of sockets) socket.destroy();
    },
    restore() {
      up = true;
    },
    async close() {
      proxy.cut();
      await new Promise((resolve) => listener.close(resolve));
    },
  };
  const listener = createServer((inbound) => {
    proxy.connections++;
    if (!up) return void inbound.resetAndDestroy();
    const outbound = connect(Number(server.port || 5672), server.hostname);
    const drop = () => {
      inbound.destroy();
      outbound.destroy();
      sockets.delete(inbound);
      sockets.delete(outbound);
      clients.delete(inbound);
    };
    clients.add(inbound);
    for (const socket of [inbound, outbound]) {
      sockets.add(socket);
      socket.on('error', drop).on('close', drop);
    }
    inbound.pipe(outbound).pipe(inbound);
  });
  await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', resolve));
  const url = new URL(AMQP_URL);
  url.host = `127.0.0.1:${(listener.address() as { port: number }).port}`;
  proxy.url = url.href;
  return proxy;
}

/** An AMQP 0-9-1 method frame of the connection class (10) on channel 0. */
function connectionMethod(methodId: number, args = Buffer.alloc(0)): Buffer {
  const payload = Buffer.concat([Buffer.from([0, 10, methodId >> 8, methodId & 0xff]), args]);
  const header = Buffer.alloc(7);
  header.writeUInt8(1, 0); // method frame
  header.writeUInt16BE(0, 1); // channel 0
  header.writeUInt32BE(payload.length, 3);
  return Buffer.concat([header, payload, Buffer.from([0xce])]);
}
