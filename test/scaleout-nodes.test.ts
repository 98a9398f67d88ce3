/**
 * Scale-out across processes: three `livepipe --scale-out` nodes on loopback behind nginx in
 * plain round-robin (no sticky sessions), over a real broker. Clients are the `eventsource`
 * package, which reconnects with Last-Event-ID as browsers do.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { EventSource } from 'eventsource';
import { ensureBuilt, LivepipeProcess } from './support/livepipe.ts';
import { startNginx, type RunningNginx } from './support/nginx.ts';
import { post } from './support/relay.ts';
import { chromiumSkip, launchChromium } from './support/browser.ts';
import { skipUnlessCi, unreachable } from './brokers/availability.ts';

const run = promisify(execFile);
const NATS_URL = process.env.LIVEPIPE_NATS_URL ?? 'nats://127.0.0.1:4222';
const AMQP_URL = process.env.LIVEPIPE_AMQP_URL ?? 'amqp://guest:guest@127.0.0.1:5672';
const KAFKA_URL = process.env.LIVEPIPE_KAFKA_URL ?? 'kafka://127.0.0.1:9092';
const REDIS_URL = process.env.LIVEPIPE_REDIS_URL ?? 'redis://127.0.0.1:6379';

interface Node {
  process: LivepipeProcess;
  base: string;
}

/** Three nodes and nginx in front of them. */
class Deployment {
  nodes: Node[] = [];
  nginx!: RunningNginx;
  private dir: string | undefined;

  async start(broker: string, count = 3): Promise<void> {
    ensureBuilt();
    this.dir = mkdtempSync(join(tmpdir(), 'livepipe-scaleout-'));
    const config = join(this.dir, 'livepipe.yaml');
    // Quick heartbeats and reconnects, so that a killed node is noticed within a test's time.
    writeFileSync(config, ['publish: true', 'retryMs: 200', 'sessionTtlMs: 30000', 'scaleOut:', '  heartbeatMs: 300', '  requestTimeoutMs: 1000', ''].join('\n'));
    const processes = Array.from({ length: count }, () => new LivepipeProcess(['--port', '0', '--broker', broker, '--config', config, '--scale-out']));
    this.nodes = await Promise.all(processes.map(async (p) => ({ process: p, base: (await p.started()).base })));
    this.nginx = await startNginx(this.nodes.map((n) => Number(new URL(n.base).port)));
    // Every node has heard the others.
    await new Promise((resolve) => setTimeout(resolve, 500));
  }

  async stop(): Promise<void> {
    await this.nginx?.stop();
    await Promise.all(this.nodes.map((n) => n.process.kill()));
    if (this.dir !== undefined) rmSync(this.dir, { recursive: true, force: true });
  }

  /** The node that serves a session (its stats count the stream). */
  async ownerOf(): Promise<number[]> {
    const counts = await Promise.all(this.nodes.map(async (n) => (n.process.running ? ((await (await fetch(`${n.base}/metrics`)).text()).match(/^livepipe_connections\{transport="sse"\} (\d+)/m)?.[1] ?? '0') : '0')));
    return counts.map(Number);
  }
}

/** An EventSource client that keeps everything it got. */
class Client {
  readonly source: EventSource;
  readonly payloads: string[] = [];
  readonly errors: Array<{ code: string; message: string }> = [];
  sessionId: string | undefined;
  configs = 0;

  constructor(url: string) {
    this.source = new EventSource(url);
    this.source.onmessage = (event) => {
      const data = JSON.parse(event.data);
      if (data.error !== undefined) this.errors.push(data.error);
      else if (data.topic === '/httpsub/config') {
        this.configs++;
        this.sessionId = data.payload.session_id;
      } else this.payloads.push(data.payload);
    };
  }

  async until(predicate: () => boolean, what: string, ms = 15_000): Promise<void> {
    const deadline = Date.now() + ms;
    while (!predicate()) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; got ${JSON.stringify({ payloads: this.payloads, errors: this.errors, configs: this.configs })}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
}

async function publish(node: Node, topic: string, body: string): Promise<void> {
  const res = await post(`${node.base}/publish?topic=${encodeURIComponent(topic)}`, body, { 'content-type': 'text/plain' });
  assert.equal(res.status, 204, JSON.stringify(res.body));
}

/** The broker-side resources of the nodes that a crash must not leave behind, counted, where the test can see them. */
type Resources = () => Promise<number>;

function suite(name: string, broker: string, unavailable: string | undefined, topic: string, keepsHistory: boolean, resources?: Resources, inBrowser = false): void {
  describe(`scale-out behind nginx over ${name}`, { skip: skipUnlessCi(unavailable) }, () => {
    const deployment = new Deployment();
    before(() => deployment.start(broker));
    after(() => deployment.stop());

    it('applies updates that land on other nodes to the session where its stream lives', async () => {
      const client = new Client(`${deployment.nginx.url}/events?topics=${topic}.a`);
      try {
        await client.until(() => client.sessionId !== undefined, 'the config event');
        // Round-robin: three updates in a row reach all three nodes, two of them not the owner.
        const added = [`${topic}.b`, `${topic}.c`, `${topic}.d`];
        let subscriptions: string[] = [];
        for (const t of added) {
          const res = await post(`${deployment.nginx.url}/update_subscriptions`, JSON.stringify({ session_id: client.sessionId, add: [t] }));
          assert.equal(res.status, 200, JSON.stringify(res.body));
          subscriptions = res.body.subscriptions;
        }
        assert.deepEqual(subscriptions.sort(), [`${topic}.a`, ...added]);
        for (const [i, t] of added.entries()) await publish(deployment.nodes[i]!, t, `to ${t}`);
        await client.until(() => client.payloads.length >= 3, 'a message on each added topic');
        assert.deepEqual(client.payloads, added.map((t) => `to ${t}`));
        assert.deepEqual(await deployment.ownerOf().then((c) => c.reduce((a, b) => a + b)), 1, 'one stream, on one node');
      } finally {
        client.source.close();
      }
    });

    it(`resumes the streams of a node killed mid-stream on the others, ${keepsHistory ? 'losing nothing' : 'reporting the gap'}`, async () => {
      const t = `${topic}.kill`;
      const clients = Array.from({ length: 6 }, () => new Client(`${deployment.nginx.url}/events?topics=${t}`));
      try {
        await Promise.all(clients.map((c) => c.until(() => c.sessionId !== undefined, 'the config event')));
        const perNode = await deployment.ownerOf();
        assert.deepEqual(perNode, [2, 2, 2], 'round-robin spread the streams');
        const victim = deployment.nodes[2]!;
        const publisher = deployment.nodes[0]!;
        const resourcesBefore = await resources?.();
        const total = 60;
        const send = async (from: number, to: number) => {
          for (let n = from; n <= to; n++) {
            if (n === 21) victim.process.child.kill('SIGKILL');
            await publish(publisher, t, String(n));
            await new Promise((resolve) => setTimeout(resolve, 20));
          }
        };
        await send(1, 40);
        // The killed node's clients reconnect through nginx to the other two and carry on.
        const reconnected = () => clients.reduce((sum, c) => sum + c.configs, 0) === clients.length + 2;
        await clients[0]!.until(reconnected, 'the killed node\'s clients to reconnect');
        await send(41, total);
        await Promise.all(clients.map((c) => c.until(() => c.payloads.includes(String(total)), `message ${total}`)));
        const expected = Array.from({ length: total }, (_, i) => String(i + 1));
        const moved = clients.filter((c) => c.configs > 1);
        assert.equal(moved.length, 2, 'the two clients of the killed node reconnected');
        for (const c of moved) assert.equal(c.configs, 2);
        for (const c of clients.filter((c) => c.configs === 1)) {
          assert.deepEqual(c.payloads, expected, 'a client of a surviving node gets everything');
          assert.deepEqual(c.errors, []);
        }
        for (const c of moved) {
          if (keepsHistory) {
            assert.deepEqual(c.payloads, expected, 'replayed from the broker: every message once, in order');
            assert.deepEqual(c.errors, []);
          } else {
            // Nothing duplicated or reordered, everything after the move delivered, and the gap announced.
            assert.deepEqual(c.payloads, [...c.payloads].sort((a, b) => Number(a) - Number(b)));
            assert.equal(new Set(c.payloads).size, c.payloads.length);
            assert.deepEqual(c.payloads.slice(-20), expected.slice(-20));
            assert.deepEqual(c.errors.map((e) => e.code), ['events-lost']);
          }
        }
        if (resources !== undefined) {
          // The killed node's queue went with its connection.
          const deadline = Date.now() + 10_000;
          while ((await resources()) !== resourcesBefore! - 1 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 200));
          assert.equal(await resources(), resourcesBefore! - 1);
        }
        // The moved sessions kept their ids and live on the survivors now: updates reach them.
        for (const c of moved) {
          const res = await post(`${deployment.nginx.url}/update_subscriptions`, JSON.stringify({ session_id: c.sessionId, add: [`${t}.more`] }));
          assert.equal(res.status, 200, JSON.stringify(res.body));
          assert.deepEqual(res.body.subscriptions.sort(), [t, `${t}.more`]);
        }
      } finally {
        for (const c of clients) c.source.close();
      }
    });

    if (inBrowser) {
      it("keeps a browser's EventSource whole when the node serving it is killed", { skip: chromiumSkip }, async () => {
        const t = `${topic}.browser`;
        const browser = await launchChromium();
        try {
          const page = await browser.newPage();
          await page.goto(`${deployment.nginx.url}/`);
          // The page's own EventSource, through the balancer: it reconnects with Last-Event-ID by itself.
          await page.evaluate((url) => {
            const w = globalThis as unknown as { got: string[]; errors: string[]; configs: number };
            w.got = [];
            w.errors = [];
            w.configs = 0;
            new EventSource(url).onmessage = (event) => {
              const data = JSON.parse(event.data);
              if (data.error) w.errors.push(data.error.code);
              else if (data.topic === '/httpsub/config') w.configs++;
              else w.got.push(data.payload);
            };
          }, `/events?topics=${t}`);
          const state = () =>
            page.evaluate(() => {
              const w = globalThis as unknown as { got: string[]; errors: string[]; configs: number };
              return { got: w.got, errors: w.errors, configs: w.configs };
            });
          const until = async (predicate: (w: Awaited<ReturnType<typeof state>>) => boolean, what: string) => {
            const deadline = Date.now() + 15_000;
            for (let w = await state(); !predicate(w); w = await state()) {
              if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(w)}`);
              await new Promise((resolve) => setTimeout(resolve, 50));
            }
          };
          await until((w) => w.configs === 1, 'the config event');
          const serving = (await deployment.ownerOf()).findIndex((n) => n === 1);
          const victim = deployment.nodes[serving]!;
          const publisher = deployment.nodes.find((n) => n !== victim && n.process.running)!;
          for (let n = 1; n <= 40; n++) {
            if (n === 11) victim.process.child.kill('SIGKILL');
            await publish(publisher, t, String(n));
            await new Promise((resolve) => setTimeout(resolve, 20));
          }
          await until((w) => w.got.includes('40'), 'message 40');
          const w = await state();
          assert.equal(w.configs, 2, 'it reconnected once, to another node');
          assert.deepEqual(w.got, Array.from({ length: 40 }, (_, i) => String(i + 1)));
          assert.deepEqual(w.errors, []);
        } finally {
          await browser.close();
        }
      });
    }
  });
}

const natsServer = new URL(NATS_URL);
const amqpServer = new URL(AMQP_URL);
suite(
  'NATS JetStream',
  `${NATS_URL}?jetstream=livepipe_scaleout&subjects=${encodeURIComponent('scaleout.>')}`,
  await unreachable('NATS', natsServer.hostname, Number(natsServer.port || 4222)),
  'scaleout',
  true,
  undefined,
  true,
);
// Only an operator sees other connections' exclusive queues: rabbitmqctl, as scripts/brokers.sh runs it.
const rabbitQueues: Resources = async () => {
  const { stdout } = await run('rabbitmqctl', ['-n', 'rabbit@localhost', '-q', 'list_queues', 'name'], { env: { ...process.env, HOME: '/var/lib/rabbitmq' }, timeout: 30_000 });
  return stdout.split('\n').filter((line) => line.startsWith('amq.gen-')).length;
};
suite('RabbitMQ', AMQP_URL, await unreachable('RabbitMQ', amqpServer.hostname, Number(amqpServer.port || 5672)), 'scaleout', false, rabbitQueues);
// Kafka has no plain publish/subscribe: node-to-node messages share one topic (src/scaleout/shared-bus.ts).
const kafkaServer = new URL(KAFKA_URL);
suite('Kafka', KAFKA_URL, await unreachable('Kafka', kafkaServer.hostname, Number(kafkaServer.port || 9092)), 'scaleout', false);
// Redis streams keep history: event ids carry the entry id, and a new node reads the streams from there.
const redisServer = new URL(REDIS_URL);
suite('Redis streams', `${REDIS_URL}?streams=1`, await unreachable('Redis', redisServer.hostname, Number(redisServer.port || 6379)), `scaleout-${process.pid}`, true);
