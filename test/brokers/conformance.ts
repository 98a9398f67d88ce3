/**
 * The one driver conformance suite (after the Go CDK's drivertest): every broker driver runs
 * it against a real server. A driver file adds one `describeConformance({...})` call.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { Broker, BrokerSubscription, SubscriptionListener } from '../../src/brokers/broker.ts';
import { RelayError } from '../../src/errors.ts';
import { openBroker } from '../../src/brokers/index.ts';
import { Waiter } from '../support/wait.ts';

export interface ConformanceHarness {
  /** Suite title, e.g. `nats (core)`. */
  name: string;
  /** Opens a fresh driver instance; two instances stand for two relay processes. */
  open(): Promise<Broker>;
  /** Publishes with the broker's own client, not through the driver. Defaults to a second driver instance. */
  publishExternally?(topic: string, body: Uint8Array): Promise<void>;
  /** Largest body to prove; 256 KiB unless the broker documents a smaller maximum. */
  maxBodyBytes?: number;
  /** Topics that pass PROTOCOL.md section 1 but that this broker cannot represent. */
  unrepresentableTopics?: string[];
  /**
   * Ordinary topics that must be representable; defaults to DEFAULT_REPRESENTABLE. Narrow it
   * only where the broker's own naming rules exclude some (and list those as unrepresentable).
   */
  representableTopics?: string[];
  /** Makes a topic unique to one test; defaults to freshTopic(), for brokers whose names cannot hold its dot. */
  freshTopic?(): string;
  /**
   * Broker-side resources (queues, consumers, groups, subscriptions) that `closed`, a driver
   * instance that had subscribed `topics` and was then closed, left behind. Empty when clean.
   */
  leftovers?(closed: Broker, topics: string[]): Promise<string[]>;
  /** Stops and starts the broker server, for the reconnect test. */
  restartServer?(): Promise<void>;
  /** Why the suite cannot run (e.g. server unreachable outside CI); the suite is then not registered. */
  unavailable?: string;
  /** Per-test timeout in ms (slow brokers such as Kafka need more). */
  timeoutMs?: number;
}

/** Topics of every shape a web app uses. */
export const DEFAULT_REPRESENTABLE = ['chat', 'orders.created', 'user-42', 'a_b', 'Ünïcødé'];

/** A topic unique to one test, so that runs never see each other's messages. */
export function freshTopic(prefix = 'conf'): string {
  return `${prefix}.${randomBytes(6).toString('hex')}`;
}

/** Collects what a subscription receives and lets a test wait for a count. */
export class Collector implements SubscriptionListener {
  readonly bodies: Buffer[] = [];
  /** The broker positions that came with the bodies (drivers with replay). */
  readonly positions: Array<number | undefined> = [];
  readonly errors: RelayError[] = [];
  recoveries = 0;
  private readonly waiter = new Waiter();

  message(body: Uint8Array, position?: number): void {
    this.bodies.push(Buffer.from(body));
    this.positions.push(position);
    this.waiter.wake();
  }

  error(error: RelayError): void {
    this.errors.push(error);
    this.waiter.wake();
  }

  recovered(): void {
    this.recoveries++;
    this.waiter.wake();
  }

  texts(): string[] {
    return this.bodies.map((b) => b.toString('utf8'));
  }

  /** Resolves when `predicate` holds, or rejects after `ms` with what was seen. */
  until(predicate: () => boolean, ms = 10_000, what = 'condition'): Promise<void> {
    const timedOut = () => new Error(`timed out waiting for ${what}; got ${this.bodies.length} messages, ${this.errors.length} errors, ${this.recoveries} recoveries`);
    return this.waiter.until(predicate, ms, timedOut, 200);
  }
}

/** Subscribes a new Collector to each of `topics`, all at once; the collectors in the same order. */
export function subscribeAll(broker: Broker, topics: string[]): Promise<Collector[]> {
  return Promise.all(topics.map(async (topic) => {
    const c = new Collector();
    await broker.subscribe(topic, c);
    return c;
  }));
}

/** An assert.rejects / assert.throws check: a RelayError with `code` whose message matches `pattern`. */
export const rejectsWith = (code: string, pattern: RegExp) => (err: unknown) => err instanceof RelayError && err.code === code && pattern.test(err.message);

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export function describeConformance(h: ConformanceHarness): void {
  if (h.unavailable !== undefined) {
    const reason = `${h.unavailable} (start the test servers with: scripts/brokers.sh up && scripts/cloud-emulators.sh up)`;
    if (process.env.CI) {
      // In CI every broker must be there: an unreachable one fails the run.
      describe(`broker conformance: ${h.name}`, () => {
        it('has its broker server running', () => assert.fail(reason));
      });
    } else {
      describe(`broker conformance: ${h.name}`, { skip: reason }, () => {});
    }
    return;
  }
  const timeout = h.timeoutMs ?? 30_000;
  const fresh = () => (h.freshTopic ? h.freshTopic() : freshTopic());
  describe(`broker conformance: ${h.name}`, { timeout: timeout * 20 }, () => {
    let a: Broker;
    let b: Broker;
    const open: Broker[] = [];
    const publish = (topic: string, body: Uint8Array | string) => {
      const bytes = typeof body === 'string' ? Buffer.from(body) : body;
      return h.publishExternally ? h.publishExternally(topic, bytes) : b.publish(topic, bytes);
    };
    const subs: BrokerSubscription[] = [];
    const subscribe = async (broker: Broker, topic: string) => {
      const c = new Collector();
      subs.push(await broker.subscribe(topic, c));
      return c;
    };

    before(async () => {
      a = await h.open();
      b = await h.open();
      open.push(a, b);
    });
    after(async () => {
      for (const s of subs) await s.close().catch(() => {});
      for (const broker of open) await broker.close().catch(() => {});
    });

    it('delivers a published message to a subscriber', { timeout }, async () => {
      const topic = fresh();
      const c = await subscribe(a, topic);
      await publish(topic, 'hello');
      await c.until(() => c.bodies.length === 1, timeout / 2, 'one message');
      assert.deepEqual(c.texts(), ['hello']);
    });

    it('publishes through the driver itself', { timeout }, async () => {
      const topic = fresh();
      const c = await subscribe(a, topic);
      await b.publish(topic, Buffer.from('via driver'));
      await c.until(() => c.bodies.length === 1, timeout / 2, 'one message');
      assert.deepEqual(c.texts(), ['via driver']);
    });

    it('keeps topics apart', { timeout }, async () => {
      const t1 = fresh();
      const t2 = fresh();
      const c1 = await subscribe(a, t1);
      const c2 = await subscribe(a, t2);
      await publish(t1, 'one');
      await publish(t2, 'two');
      await c1.until(() => c1.bodies.length >= 1, timeout / 2, 'message on t1');
      await c2.until(() => c2.bodies.length >= 1, timeout / 2, 'message on t2');
      await sleep(300);
      assert.deepEqual(c1.texts(), ['one']);
      assert.deepEqual(c2.texts(), ['two']);
    });

    it('stops delivery after unsubscribe', { timeout }, async () => {
      const topic = fresh();
      const c = new Collector();
      const sub = await a.subscribe(topic, c);
      const witness = await subscribe(b, topic);
      await publish(topic, 'before');
      await c.until(() => c.bodies.length === 1, timeout / 2, 'first message');
      await sub.close();
      await sub.close(); // idempotent
      await publish(topic, 'after');
      await witness.until(() => witness.bodies.length === 2, timeout / 2, 'witness to get both');
      await sleep(300);
      assert.deepEqual(c.texts(), ['before']);
    });

    it('broadcasts every message to every relay process (no competing consumers)', { timeout }, async () => {
      const topic = fresh();
      const ca = await subscribe(a, topic);
      const cb = await subscribe(b, topic);
      const n = 20;
      for (let i = 0; i < n; i++) await publish(topic, `m${i}`);
      await ca.until(() => ca.bodies.length === n, timeout / 2, `${n} messages on relay A`);
      await cb.until(() => cb.bodies.length === n, timeout / 2, `${n} messages on relay B`);
    });

    it('carries binary bodies byte for byte', { timeout }, async () => {
      const topic = fresh();
      const c = await subscribe(a, topic);
      const body = Buffer.concat([Buffer.from([0, 1, 2, 0xff, 0xfe, 0x80, 0xc3, 0x28, 10, 13]), randomBytes(1000)]);
      await publish(topic, body);
      await c.until(() => c.bodies.length === 1, timeout / 2, 'binary message');
      assert.ok(c.bodies[0]!.equals(body), 'binary body changed in transit');
    });

    it(`carries large bodies`, { timeout }, async () => {
      const topic = fresh();
      const c = await subscribe(a, topic);
      const size = h.maxBodyBytes ?? 256 * 1024;
      const body = Buffer.alloc(size, 'x');
      randomBytes(64).copy(body, size - 64);
      await publish(topic, body);
      await c.until(() => c.bodies.length === 1, timeout / 2, `a ${size}-byte message`);
      assert.equal(c.bodies[0]!.length, size);
      assert.ok(c.bodies[0]!.equals(body));
    });

    it('keeps per-topic order', { timeout }, async () => {
      const topic = fresh();
      const c = await subscribe(a, topic);
      const n = 200;
      for (let i = 0; i < n; i++) await publish(topic, String(i));
      await c.until(() => c.bodies.length === n, timeout / 2, `${n} ordered messages`);
      assert.deepEqual(c.texts(), Array.from({ length: n }, (_, i) => String(i)));
    });

    it('rejects topics the broker cannot represent with invalid-topic', { timeout }, async () => {
      for (const topic of h.unrepresentableTopics ?? []) {
        assert.notEqual(a.topicProblem(topic), undefined, `${JSON.stringify(topic)} should be rejected`);
        await assert.rejects(a.subscribe(topic, new Collector()), (err: unknown) => err instanceof RelayError && err.code === 'invalid-topic');
      }
      // Ordinary topics of every shape a web app uses are representable.
      for (const topic of h.representableTopics ?? DEFAULT_REPRESENTABLE) {
        assert.equal(a.topicProblem(topic), undefined, `${JSON.stringify(topic)} should be accepted`);
      }
    });

    it('leaves no broker resources behind after close', { timeout }, async () => {
      const c = await h.open();
      const topic = fresh();
      const other = fresh();
      const collector = new Collector();
      await c.subscribe(topic, collector);
      await c.subscribe(other, new Collector());
      await publish(topic, 'x');
      await collector.until(() => collector.bodies.length === 1, timeout / 2, 'a message before close');
      assert.equal(c.isConnected(), true);
      await c.close();
      await c.close(); // idempotent
      assert.equal(c.isConnected(), false);
      if (h.leftovers) assert.deepEqual(await h.leftovers(c, [topic, other]), [], 'broker resources left after close');
    });

    if (h.restartServer) {
      it('reports a broker restart and recovers delivery', { timeout: timeout * 4 }, async () => {
        const topic = fresh();
        const c = await subscribe(a, topic);
        await publish(topic, 'before restart');
        await c.until(() => c.bodies.length === 1, timeout / 2, 'message before restart');
        await h.restartServer!();
        await c.until(() => c.errors.length >= 1, timeout, 'an error report after the restart');
        assert.equal(c.errors[0]!.code, 'subscription-failure');
        await c.until(() => c.recoveries >= 1, timeout * 2, 'recovery after the restart');
        // Delivery works again, through the recovered subscription.
        let n = 0;
        const deadline = Date.now() + timeout;
        while (!c.texts().includes('after restart') && Date.now() < deadline) {
          await publish(topic, 'after restart').catch(() => {});
          n++;
          await sleep(250);
        }
        assert.ok(c.texts().includes('after restart'), `no delivery after recovery (${n} tries)`);
        assert.equal(a.isConnected(), true);
      });
    }
  });
}

/** Opens `url` and checks that it gave the driver class a driver test is about. */
export async function openDriver<T extends Broker>(url: string, driver: abstract new (...args: never[]) => T): Promise<T> {
  const broker = await openBroker(url);
  assert.ok(broker instanceof driver, `${url} opened a ${broker.constructor.name}, not a ${driver.name}`);
  return broker;
}

/**
 * Broker.replay, for drivers of brokers that keep history: what the broker holds after a
 * position a subscriber was given, per topic in order, within a limit (then incomplete).
 */
export async function assertReplays(broker: Broker, a: string, b: string): Promise<void> {
  const c = new Collector();
  await broker.subscribe(a, c);
  await broker.publish(a, Buffer.from('a1'));
  await c.until(() => c.bodies.length === 1);
  const from = c.positions[0];
  assert.equal(typeof from, 'number', 'a delivery carries its position');
  for (const [topic, body] of [[b, 'b1'], [a, 'a2'], [b, 'b2']] as const) await broker.publish(topic, Buffer.from(body));
  const held = await broker.replay!([a, b], from!, 100, a);
  assert.equal(held.complete, true);
  const of = (topic: string) => held.messages.filter((m) => m.topic === topic);
  assert.deepEqual(of(a).map((m) => Buffer.from(m.body).toString()), ['a2']);
  assert.deepEqual(of(b).map((m) => Buffer.from(m.body).toString()), ['b1', 'b2']);
  assert.ok(of(a).every((m) => m.position > from!), 'only what came after the position, on its topic');
  assert.ok(of(b)[0]!.position < of(b)[1]!.position, 'positions order a topic');
  const limited = await broker.replay!([a, b], from!, 2, a);
  assert.equal(limited.messages.length, 2);
  assert.equal(limited.complete, false, 'past the limit, the replay says it is not all');
  await c.until(() => c.bodies.length === 2);
  assert.equal(c.positions[1], of(a)[0]!.position, 'live and replayed positions agree');
}
