/**
 * The per-topic bookkeeping that the awssns, azuresb, gcppubsub, mqtt and redis drivers share,
 * driven directly: the orders of events that a live broker produces only by chance.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { Collector, rejectsWith } from './conformance.ts';
import { TopicEntries } from '../../src/brokers/topic-entries.ts';
import type { TopicEntry } from '../../src/brokers/topic-entries.ts';
import { RelayError } from '../../src/errors.ts';

/** A setup that the test settles by hand. */
function gate() {
  let open!: () => void;
  let fail!: (err: unknown) => void;
  const promise = new Promise<void>((resolve, reject) => {
    open = resolve;
    fail = reject;
  });
  return { promise, open, fail };
}

const create = (): TopicEntry => ({ listeners: new Set(), ready: Promise.resolve() });

describe('TopicEntries', () => {
  it('join: one setup per topic; a failed one rejects every waiting subscriber and is tried afresh next time', async () => {
    const entries = new TopicEntries<TopicEntry>();
    const setup = gate();
    let starts = 0;
    const hooks = {
      create,
      start: () => (starts++, setup.promise),
      failure: (err: unknown) => new RelayError('subscription-failure', `wrapped: ${(err as Error).message}`),
      dispose: async () => {},
    };
    const one = entries.join('t', new Collector(), hooks);
    const two = entries.join('t', new Collector(), hooks);
    setup.fail(new Error('refused'));
    await assert.rejects(one, rejectsWith('subscription-failure', /^wrapped: refused$/));
    await assert.rejects(two, rejectsWith('subscription-failure', /^wrapped: refused$/));
    assert.equal(starts, 1);
    assert.equal(entries.size, 0, 'the failed entry is gone');
    await entries.join('t', new Collector(), { ...hooks, start: async () => void starts++ });
    assert.equal(starts, 2);
    assert.equal(entries.get('t')!.listeners.size, 1);
  });

  it('join: a subscriber still waiting keeps the entry; the last close disposes it once', async () => {
    const entries = new TopicEntries<TopicEntry>();
    const disposed: TopicEntry[] = [];
    const hooks = { create, start: async () => {}, failure: () => new RelayError('internal', 'unused'), dispose: async (e: TopicEntry) => void disposed.push(e) };
    const first = await entries.join('t', new Collector(), hooks);
    const waiting = entries.join('t', new Collector(), hooks); // not resolved yet when the first one leaves
    await first.close();
    assert.equal(disposed.length, 0, 'the second subscriber still needs it');
    const second = await waiting;
    await second.close();
    await second.close();
    assert.equal(disposed.length, 1);
    assert.equal(entries.size, 0);
  });

  it('joinWhenReady: counts a listener in only after setup, and says so when the entry went away meanwhile', async () => {
    const entries = new TopicEntries<TopicEntry>();
    const setup = gate();
    const released: string[] = [];
    const hooks = { create, start: () => setup.promise, release: async () => void released.push('t') };
    const listener = new Collector();
    const pending = entries.joinWhenReady('t', listener, hooks);
    assert.equal(entries.get('t')!.listeners.size, 0, 'not a listener before the setup ends');
    entries.clear(); // as close() of the broker does
    setup.open();
    assert.equal(await pending, undefined, 'the caller must start over');
    const sub = await entries.joinWhenReady('t', listener, { ...hooks, start: async () => {} });
    assert.ok(sub !== undefined);
    assert.equal(entries.get('t')!.listeners.size, 1);
    const closing = sub.close();
    assert.equal(sub.close(), closing, 'a repeated close() is the same promise');
    await closing;
    assert.deepEqual(released, ['t']);
  });
});
