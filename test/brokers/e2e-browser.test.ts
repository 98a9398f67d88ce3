/**
 * End to end for every real broker: `livepipe --broker <url>` relays to a browser's own
 * EventSource (Debian's headless Chromium) a message that the broker's own client library
 * published directly, knowing nothing of livepipe.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes, randomUUID } from 'node:crypto';
import type { Browser } from 'playwright-core';
import { chromiumSkip, launchChromium } from '../support/browser.ts';
import { connect as natsConnect } from '@nats-io/transport-node';
import * as amqplib from 'amqplib';
import { Admin, Producer } from '@platformatic/kafka';
import { Redis } from 'ioredis';
import mqtt from 'mqtt';
import pg from 'pg';
import { PubSub } from '@google-cloud/pubsub';
import { SNSClient, CreateTopicCommand, PublishCommand } from '@aws-sdk/client-sns';
import { skipUnlessCi, unreachable } from './availability.ts';
import { ensureBuilt, LivepipeProcess } from '../support/livepipe.ts';

// The in-memory cloud emulators (scripts/cloud-emulators.sh). Set here, so that both the test's
// own clients and the livepipe children (which inherit this environment) use them, and the SDKs
// never probe the GCE / EC2 metadata servers.
process.env.PUBSUB_EMULATOR_HOST ??= '127.0.0.1:8085';
process.env.METADATA_SERVER_DETECTION ??= 'none';
process.env.AWS_ACCESS_KEY_ID ??= 'test';
process.env.AWS_SECRET_ACCESS_KEY ??= 'test';
process.env.AWS_EC2_METADATA_DISABLED = 'true';

const NATS_URL = process.env.LIVEPIPE_NATS_URL ?? 'nats://127.0.0.1:4222';
const AMQP_URL = process.env.LIVEPIPE_AMQP_URL ?? 'amqp://guest:guest@127.0.0.1:5672';
const KAFKA_URL = process.env.LIVEPIPE_KAFKA_URL ?? 'kafka://127.0.0.1:9092';
const REDIS_URL = process.env.LIVEPIPE_REDIS_URL ?? 'redis://127.0.0.1:6379';
const MQTT_URL = process.env.LIVEPIPE_MQTT_URL ?? 'mqtt://127.0.0.1:1883';
const PG_URL = process.env.LIVEPIPE_POSTGRES_URL ?? 'postgres://postgres:postgres@127.0.0.1:5432/livepipe_test';
const GCP_PROJECT = 'livepipe-test';
const AWS_ENDPOINT = process.env.LIVEPIPE_AWS_ENDPOINT ?? 'http://127.0.0.1:4566';
const AWS_REGION = 'us-east-1';

const hostPort = (url: string, port: number): [string, number] => {
  const u = new URL(url);
  return [u.hostname, Number(u.port || port)];
};
const kafkaBrokers = () => [hostPort(KAFKA_URL, 9092).join(':')];
const hex = () => randomBytes(6).toString('hex');

interface Case {
  name: string;
  url: string;
  /** Why its server cannot be reached, or undefined. */
  unavailable: Promise<string | undefined>;
  /** A topic no other run uses, valid for this broker. */
  topic(): string;
  /** Publishes `body` on `topic` with the broker's own client, used directly. */
  publish(topic: string, body: string): Promise<void>;
  /** Removes what the run left on a broker that keeps topics. */
  cleanup?(topic: string): Promise<void>;
}

const cases: Case[] = [
  {
    name: 'nats',
    url: NATS_URL,
    unavailable: unreachable('NATS', ...hostPort(NATS_URL, 4222)),
    topic: () => `e2e.${hex()}`,
    async publish(topic, body) {
      const nc = await natsConnect({ servers: new URL(NATS_URL).host });
      nc.publish(topic, body);
      await nc.flush();
      await nc.close();
    },
  },
  {
    name: 'amqp',
    url: AMQP_URL,
    unavailable: unreachable('RabbitMQ', ...hostPort(AMQP_URL, 5672)),
    topic: () => `e2e.${hex()}`,
    async publish(topic, body) {
      const conn = await amqplib.connect(AMQP_URL);
      try {
        const channel = await conn.createConfirmChannel();
        // livepipe's default exchange; the topic is the routing key.
        channel.publish('livepipe', topic, Buffer.from(body));
        await channel.waitForConfirms();
      } finally {
        await conn.close();
      }
    },
  },
  {
    name: 'kafka',
    url: KAFKA_URL,
    unavailable: unreachable('Kafka', ...hostPort(KAFKA_URL, 9092)),
    topic: () => `e2e.${hex()}`,
    async publish(topic, body) {
      const producer = new Producer({ clientId: 'livepipe-e2e-producer', bootstrapBrokers: kafkaBrokers() });
      try {
        await producer.send({ messages: [{ topic, value: Buffer.from(body) }] });
      } finally {
        await producer.close();
      }
    },
    // Kafka keeps topics until deleted; the relay created this one when it subscribed.
    async cleanup(topic) {
      const admin = new Admin({ clientId: 'livepipe-e2e-admin', bootstrapBrokers: kafkaBrokers() });
      try {
        await admin.deleteTopics({ topics: [topic] });
      } finally {
        await admin.close();
      }
    },
  },
  {
    name: 'redis',
    url: REDIS_URL,
    unavailable: unreachable('Redis', ...hostPort(REDIS_URL, 6379)),
    topic: () => `e2e.${hex()}`,
    async publish(topic, body) {
      const redis = new Redis(REDIS_URL);
      try {
        assert.equal(await redis.publish(topic, body), 1, 'exactly one subscriber: the relay');
      } finally {
        redis.disconnect();
      }
    },
  },
  {
    name: 'mqtt',
    url: MQTT_URL,
    unavailable: unreachable('mosquitto', ...hostPort(MQTT_URL, 1883)),
    topic: () => `e2e/${hex()}`,
    async publish(topic, body) {
      const client = await mqtt.connectAsync(MQTT_URL, { reconnectPeriod: 0 });
      try {
        await client.publishAsync(topic, body, { qos: 1 });
      } finally {
        await client.endAsync();
      }
    },
  },
  {
    name: 'postgres',
    url: PG_URL,
    unavailable: unreachable('Postgres', ...hostPort(PG_URL, 5432)),
    topic: () => `e2e.${hex()}`,
    async publish(topic, body) {
      const client = new pg.Client({ connectionString: PG_URL });
      await client.connect();
      try {
        await client.query('SELECT pg_notify($1, $2)', [topic, body]);
      } finally {
        await client.end();
      }
    },
  },
  {
    name: 'gcppubsub',
    url: `gcppubsub://${GCP_PROJECT}`,
    unavailable: unreachable('the Pub/Sub emulator', ...hostPort(`http://${process.env.PUBSUB_EMULATOR_HOST}`, 8085)),
    // Topic ids start with a letter; the relay creates the topic when it subscribes.
    topic: () => `e2e.${hex()}`,
    async publish(topic, body) {
      const pubsub = new PubSub({ projectId: GCP_PROJECT });
      try {
        await pubsub.topic(topic).publishMessage({ data: Buffer.from(body) });
      } finally {
        await pubsub.close();
      }
    },
  },
  {
    name: 'awssns',
    url: `awssns://?endpoint=${encodeURIComponent(AWS_ENDPOINT)}&region=${AWS_REGION}`,
    unavailable: unreachable('moto (SNS/SQS)', ...hostPort(AWS_ENDPOINT, 80)),
    // SNS names hold no dot.
    topic: () => `e2e-${hex()}`,
    async publish(topic, body) {
      const sns = new SNSClient({ endpoint: AWS_ENDPOINT, region: AWS_REGION });
      try {
        // CreateTopic is idempotent: it returns the ARN of the topic the relay subscribed to.
        const { TopicArn } = await sns.send(new CreateTopicCommand({ Name: topic }));
        await sns.send(new PublishCommand({ TopicArn, Message: body }));
      } finally {
        sns.destroy();
      }
    },
  },
];

const skips = new Map(await Promise.all(cases.map(async (c) => [c.name, chromiumSkip || skipUnlessCi(await c.unavailable)] as const)));

// The callbacks given to page.evaluate / waitForFunction run in the browser; the project's
// types have no DOM, so this declares the little of it they use.
interface Received {
  events: Array<{ topic?: string; payload?: unknown; error?: unknown }>;
  failures: number;
}
declare const window: { e2e: Received };

describe('real brokers to a browser EventSource through the livepipe CLI', { timeout: 180_000 }, () => {
  let browser: Browser;
  // Started together in `before`; each test awaits its own relay, so one failure stays with its broker.
  const relays = new Map<string, Promise<{ lp: LivepipeProcess; base: string }>>();
  const processes: LivepipeProcess[] = [];
  const cleanups: Array<() => Promise<void>> = [];

  before(async () => {
    ensureBuilt();
    for (const c of cases) {
      if (skips.get(c.name)) continue;
      const lp = new LivepipeProcess(['--broker', c.url, '--port', '0']);
      processes.push(lp);
      const started = lp.started(30_000).then(({ base }) => ({ lp, base }));
      started.catch(() => {}); // reported by that broker's test
      relays.set(c.name, started);
    }
    if (!chromiumSkip) browser = await launchChromium();
  });

  after(async () => {
    await browser?.close();
    await Promise.all(processes.map((lp) => lp.stop().catch(() => lp.kill())));
    for (const cleanup of cleanups) await cleanup().catch((err: unknown) => console.error(`cleanup failed: ${String(err)}`));
  });

  for (const c of cases) {
    it(`${c.name}: a message published with the broker's own client reaches the page's EventSource`, { skip: skips.get(c.name) }, async () => {
      const { base, lp } = await relays.get(c.name)!;
      const topic = c.topic();
      if (c.cleanup) cleanups.push(() => c.cleanup!(topic));
      const page = await browser.newPage();
      try {
        page.setDefaultTimeout(30_000);
        // A page on the relay's origin, so that the EventSource's relative URL reaches the relay.
        await page.goto(`${base}/healthz`);
        await page.evaluate((topics) => {
          const w = window;
          w.e2e = { events: [], failures: 0 };
          const source = new EventSource(`/events?topics=${encodeURIComponent(topics)}`);
          source.onmessage = (e) => w.e2e.events.push(JSON.parse(e.data));
          source.onerror = () => w.e2e.failures++;
        }, topic);
        // The config event comes once the broker subscription is in place.
        await page.waitForFunction(() => window.e2e.events.length > 0);
        const [config] = await page.evaluate(() => window.e2e.events);
        assert.equal(config?.topic, '/httpsub/config');
        assert.deepEqual((config?.payload as { subscriptions: string[] }).subscriptions, [topic]);

        const body = `${c.name} "e2e" ünï ${randomUUID()}`;
        await c.publish(topic, body);
        await page.waitForFunction(() => window.e2e.events.length > 1);
        const received = await page.evaluate(() => window.e2e);
        assert.deepEqual(received.events.slice(1), [{ topic, payload: body }]);
        assert.equal(received.failures, 0, 'the EventSource never lost its connection');
      } catch (err) {
        throw new Error(`${(err as Error).message}\nlivepipe stdout:\n${lp.stdout}\nstderr:\n${lp.stderr}`, { cause: err });
      } finally {
        await page.close();
      }
    });
  }
});
