import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { describeConformance, Collector, freshTopic } from './conformance.ts';
import { openBroker } from '../../src/brokers/index.ts';
import { MemBroker } from '../../src/brokers/mem.ts';

const bus = `conformance-${process.pid}`;
describeConformance({
  name: 'mem',
  async open() {
    const broker = await openBroker(`mem://${bus}`);
    assert.ok(broker instanceof MemBroker);
    return broker;
  },
  async leftovers(_closed, topics) {
    const probe = new MemBroker(bus);
    const held = probe.activeTopics();
    await probe.close();
    return topics.filter((t) => held.includes(t));
  },
});

describe('mem broker', () => {
  it('keeps separate buses apart', async () => {
    const one = await openBroker('mem://one');
    const two = await openBroker('mem://two');
    const topic = freshTopic();
    const c = new Collector();
    await two.subscribe(topic, c);
    await one.publish(topic, Buffer.from('x'));
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(c.bodies.length, 0);
    await one.close();
    await two.close();
  });

  it('reports a simulated outage and recovers', async () => {
    const broker = new MemBroker('outage');
    const publisher = new MemBroker('outage');
    const topic = freshTopic();
    const c = new Collector();
    await broker.subscribe(topic, c);
    broker.beginOutage();
    assert.equal(c.errors[0]?.code, 'subscription-failure');
    assert.equal(broker.isConnected(), false);
    await publisher.publish(topic, Buffer.from('lost'));
    broker.endOutage();
    await publisher.publish(topic, Buffer.from('kept'));
    assert.equal(c.recoveries, 1);
    assert.deepEqual(c.texts(), ['kept']);
    await broker.close();
    await publisher.close();
  });

  it('rejects an unknown scheme with the list of known ones', async () => {
    await assert.rejects(openBroker('nope://x'), /no broker driver for nope:\/\/ \(known: .*mem:\/\//);
    await assert.rejects(openBroker('not a url'), /is not a URL/);
  });
});
