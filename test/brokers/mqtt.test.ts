import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import mqtt from 'mqtt';
import type { IConnackPacket, MqttClient } from 'mqtt';
import { describeConformance, Collector, freshTopic, rejectsWith, sleep, subscribeAll, openDriver } from './conformance.ts';
import { restartBroker, skipUnlessCi, unreachable } from './availability.ts';
import { openBroker } from '../../src/brokers/index.ts';
import type { Broker } from '../../src/brokers/broker.ts';
import { MqttBroker } from '../../src/brokers/mqtt.ts';

const MQTT_URL = process.env.LIVEPIPE_MQTT_URL ?? 'mqtt://127.0.0.1:1883';
const server = new URL(MQTT_URL);
const unavailable = await unreachable('mosquitto', server.hostname, Number(server.port || 1883));

// The broker's own client, used directly: a connection that knows nothing of the driver.
let raw: MqttClient | undefined;
async function client(): Promise<MqttClient> {
  raw ??= await mqtt.connectAsync(MQTT_URL, { reconnectPeriod: 500 });
  return raw;
}
after(() => raw?.endAsync());

const openMqtt = (url = MQTT_URL): Promise<MqttBroker> => openDriver(url, MqttBroker);

/**
 * Whether the broker kept session state (subscriptions, queued messages) for `clientId`: an
 * MQTT 5 CONNECT with the same id and clean start off gets session-present=1 if so. Session
 * expiry 0 makes the probe's own session end with it. This cannot see a connection that is
 * still open with a clean session (mosquitto then answers 0 too, and 2.0 has no admin view of
 * connections or subscriptions, nor PUBACK "no matching subscribers"); the suite checks
 * isConnected() for that.
 */
async function sessionPresent(clientId: string): Promise<boolean> {
  const probe = mqtt.connect(MQTT_URL, { clientId, clean: false, protocolVersion: 5, properties: { sessionExpiryInterval: 0 }, reconnectPeriod: 0 });
  try {
    const connack = await new Promise<IConnackPacket>((resolve, reject) => {
      probe.once('connect', resolve);
      probe.once('error', reject);
    });
    return connack.sessionPresent;
  } finally {
    await probe.endAsync();
  }
}

describeConformance({
  name: 'mqtt (mosquitto)',
  unavailable,
  open: () => openMqtt(),
  async publishExternally(topic, body) {
    await (await client()).publishAsync(topic, Buffer.from(body), { qos: 1 });
  },
  unrepresentableTopics: ['+', '#', 'a/+/b', 'a/#', 'a+b', 'c#', '$SYS/x', '$share/g/t', 'a\u0085b', 'a\uFDD0b', 'a\uFFFEb', 'x\u{1FFFE}y'],
  async leftovers(closed) {
    const id = (closed as MqttBroker).clientId;
    assert.match(id, /^livepipe[0-9a-f]{14}$/);
    return (await sessionPresent(id)) ? [`session of client ${id}`] : [];
  },
  restartServer: () => restartBroker('mosquitto'),
});

describe('mqtt driver', { skip: skipUnlessCi(unavailable) }, () => {
  let broker: Broker;
  before(async () => {
    broker = await openMqtt();
  });
  after(() => broker.close());

  it('enforces the topic rules, naming the one a topic breaks', async () => {
    for (const t of ['+', 'a/+', 'a/#', 'a+b']) assert.match(broker.topicProblem(t) ?? '', /\+ or #.*wildcards/, t);
    assert.match(broker.topicProblem('$SYS/broker/version') ?? '', /starting with \$ are reserved/);
    for (const t of ['a\u0085', '\uFDEF', 'a\uFFFF']) assert.match(broker.topicProblem(t) ?? '', /U\+0080 to U\+009F or Unicode noncharacters/, JSON.stringify(t));
    await assert.rejects(broker.subscribe('news/#', new Collector()), rejectsWith('invalid-topic', /news\/#.*wildcards/));
    await assert.rejects(broker.publish('a/+/b', Buffer.from('x')), rejectsWith('invalid-topic', /wildcards/));
    for (const t of ['a/b', 'a//b', '/a', 'a/', 'a$', 'a b', 'a\u00a0b', 'ä/ö', '\u{1F600}']) assert.equal(broker.topicProblem(t), undefined, t);
  });

  it('delivers topics with empty levels to exactly their subscribers', async () => {
    const run = freshTopic('m');
    const topics = [`${run}//x`, `/${run}`, `${run}/`];
    const collectors = await subscribeAll(broker, topics);
    for (const t of topics) await (await client()).publishAsync(t, t, { qos: 1 });
    for (const c of collectors) await c.until(() => c.bodies.length === 1);
    await sleep(200);
    for (const [i, c] of collectors.entries()) assert.deepEqual(c.texts(), [topics[i]]);
  });

  it('does not deliver the retained message that precedes the subscription', async () => {
    const topic = freshTopic();
    const raw = await client();
    await raw.publishAsync(topic, 'retained', { qos: 1, retain: true });
    try {
      const c = new Collector();
      await broker.subscribe(topic, c);
      await raw.publishAsync(topic, 'live', { qos: 1, retain: true });
      await c.until(() => c.bodies.length === 1);
      await sleep(300);
      assert.deepEqual(c.texts(), ['live']);
    } finally {
      await raw.publishAsync(topic, '', { qos: 1, retain: true }); // clears the retained message
    }
  });

  it('speaks MQTT 3.1.1 too, and leaves no session behind', async () => {
    const old = await openMqtt(`${MQTT_URL}?protocol=3.1.1`);
    const topic = freshTopic();
    const c = new Collector();
    await old.subscribe(topic, c);
    await (await client()).publishAsync(topic, 'v4', { qos: 1 });
    await c.until(() => c.bodies.length === 1);
    await old.close();
    assert.equal(await sessionPresent(old.clientId), false);
  });

  it('rejects bad options with bad-request and a message naming them', async () => {
    await assert.rejects(openBroker(`${MQTT_URL}?protocol=4`), rejectsWith('bad-request', /protocol="4": use 5 or 3\.1\.1/));
    await assert.rejects(openBroker(`${MQTT_URL}?qos=2`), rejectsWith('bad-request', /unknown mqtt:\/\/ option qos \(known: protocol\)/));
  });

  it('reports an unreachable server as broker-unavailable', async () => {
    await assert.rejects(openBroker('mqtt://127.0.0.1:1'), rejectsWith('broker-unavailable', /could not connect to the MQTT broker at 127\.0\.0\.1:1/));
  });
});
