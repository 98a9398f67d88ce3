import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createRelay, MemBroker, type Broker } from '../src/index.ts';
import { checkPublishAllowed } from '../src/http/shared.ts';
import { startRelay, SseReader, post, type RunningRelay } from './support/relay.ts';

// PROTOCOL.md section 4: POST /publish?topic=a against a real relay over HTTP.

function publish(r: RunningRelay, query: string, body: string | Buffer, headers: Record<string, string> = {}) {
  return post(`${r.base}/publish${query}`, body, headers);
}

function assertError(res: { status: number; body: any; headers: Headers }, status: number, code: string): void {
  assert.equal(res.status, status, JSON.stringify(res.body));
  assert.match(res.headers.get('content-type') ?? '', /^application\/json/);
  assert.equal(res.body?.error?.code, code, JSON.stringify(res.body));
  assert.ok(typeof res.body.error.message === 'string' && res.body.error.message.length > 0);
}

async function openStream(r: RunningRelay, topics: string): Promise<SseReader> {
  const s = await SseReader.open(`${r.base}/events?topics=${encodeURIComponent(topics)}`);
  await s.until(() => s.events.length >= 1, 5000, 'config event');
  return s;
}

describe('POST /publish (default options, in-memory broker)', () => {
  let r: RunningRelay;
  before(async () => {
    r = await startRelay({ maxBodyBytes: 1024, heartbeatMs: 60_000 });
  });
  after(() => r.close());

  it('is enabled by default on the in-memory broker and publishes the raw body: 204, empty response', async () => {
    const s = await openStream(r, 'a');
    const res = await publish(r, '?topic=a', 'hello "world"\nline two');
    assert.equal(res.status, 204);
    assert.equal(res.body, undefined);
    await s.until(() => s.messages().length >= 1);
    assert.deepEqual(s.messages()[0]!.json, { topic: 'a', payload: 'hello "world"\nline two' });
    s.close();
  });

  it('carries a binary body byte-exact as payload_base64, whatever the content type', async () => {
    const s = await openStream(r, 'bin');
    const bytes = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
    assert.equal((await publish(r, '?topic=bin', bytes, { 'content-type': 'application/octet-stream' })).status, 204);
    const invalidUtf8 = Buffer.from([0xc3, 0x28, 0xff]);
    assert.equal((await publish(r, '?topic=bin', invalidUtf8, { 'content-type': 'application/json' })).status, 204);
    await s.until(() => s.messages().length >= 2);
    const [first, second] = s.messages();
    assert.deepEqual(first!.json, { topic: 'bin', payload_base64: bytes.toString('base64') });
    assert.deepEqual(Buffer.from(first!.json.payload_base64, 'base64'), bytes);
    assert.deepEqual(Buffer.from(second!.json.payload_base64, 'base64'), invalidUtf8);
    s.close();
  });

  it('publishes JSON and form bodies as their raw text, and an empty body as an empty payload', async () => {
    const s = await openStream(r, 'raw');
    assert.equal((await publish(r, '?topic=raw', '{"n": 1}', { 'content-type': 'application/json' })).status, 204);
    assert.equal((await publish(r, '?topic=raw', 'a=1&b=2', { 'content-type': 'application/x-www-form-urlencoded' })).status, 204);
    assert.equal((await publish(r, '?topic=raw', '')).status, 204);
    await s.until(() => s.messages().length >= 3);
    assert.deepEqual(s.messages().map((m) => m.json.payload), ['{"n": 1}', 'a=1&b=2', '']);
    s.close();
  });

  it('takes a percent-encoded multibyte topic', async () => {
    const topic = 'wörld/🎉 x';
    const s = await openStream(r, topic);
    assert.equal((await publish(r, `?topic=${encodeURIComponent(topic)}`, 'hi')).status, 204);
    await s.until(() => s.messages().length >= 1);
    assert.deepEqual(s.messages()[0]!.json, { topic, payload: 'hi' });
    s.close();
  });

  it('400 invalid-topic for a missing, empty or invalid topic', async () => {
    for (const query of ['', '?topic=', '?other=a', `?topic=${encodeURIComponent('a,b')}`, `?topic=${encodeURIComponent('a\nb')}`, `?topic=${'a'.repeat(257)}`]) {
      assertError(await publish(r, query, 'x'), 400, 'invalid-topic');
    }
  });

  it('400 invalid-topic for a reserved topic', async () => {
    for (const topic of ['/httpsub/config', '/livepipe/anything']) {
      assertError(await publish(r, `?topic=${encodeURIComponent(topic)}`, 'spoof'), 400, 'invalid-topic');
    }
  });

  it('413 too-large, with a content-length and streamed without one; nothing is published', async () => {
    const s = await openStream(r, 'big');
    assertError(await publish(r, '?topic=big', 'x'.repeat(2000)), 413, 'too-large');
    const chunks = [Buffer.alloc(600, 1), Buffer.alloc(600, 2)];
    const res = await fetch(`${r.base}/publish?topic=big`, {
      method: 'POST',
      body: new ReadableStream({
        pull(controller) {
          const next = chunks.shift();
          if (next === undefined) controller.close();
          else controller.enqueue(next);
        },
      }),
      duplex: 'half',
    } as RequestInit);
    assert.equal(res.status, 413);
    assert.equal(((await res.json()) as any).error.code, 'too-large');
    // Exactly at the limit is fine; the stream sees only that message.
    assert.equal((await publish(r, '?topic=big', 'y'.repeat(1024))).status, 204);
    await s.until(() => s.messages().length >= 1);
    assert.deepEqual(s.messages().map((m) => m.json.payload), ['y'.repeat(1024)]);
    s.close();
  });
});

describe('POST /publish when disabled or guarded by a token', () => {
  it('publish: false → 404 not-found JSON', async () => {
    const r = await startRelay({ publish: false });
    try {
      assertError(await publish(r, '?topic=a', 'x'), 404, 'not-found');
    } finally {
      await r.close();
    }
  });

  it('is disabled by default on a broker other than the in-memory one', async () => {
    const mem = new MemBroker(`other-${process.pid}-${Math.random()}`);
    const other: Broker = { ...brokerMethods(mem), scheme: 'fake' };
    const r = await startRelay({ broker: other });
    try {
      assertError(await publish(r, '?topic=a', 'x'), 404, 'not-found');
    } finally {
      await r.close();
      await mem.close();
    }
  });

  it('by default on the in-memory broker, allows only requests that arrive on a loopback address', async () => {
    // A relay cannot listen on another interface here, so the decision is checked directly too.
    assert.doesNotThrow(() => checkPublishAllowed('loopback', undefined, '127.0.0.1'));
    assert.doesNotThrow(() => checkPublishAllowed('loopback', undefined, '::ffff:127.0.0.1'));
    assert.doesNotThrow(() => checkPublishAllowed('loopback', undefined, '::1'));
    for (const address of ['10.0.0.5', '192.168.1.2', '::ffff:10.0.0.5', 'fe80::1', undefined]) {
      assert.throws(() => checkPublishAllowed('loopback', undefined, address), (err: any) => err.code === 'forbidden' && /loopback/.test(err.message), String(address));
    }
    // The fetch handler cannot see its listener: it refuses unless publishing is set explicitly.
    const relay = await createRelay({ broker: `mem://fetch-default-${process.pid}` });
    try {
      const res = await relay.fetch(new Request('http://127.0.0.1/publish?topic=a', { method: 'POST', body: 'x' }));
      assert.equal(res.status, 403);
      assert.equal(((await res.json()) as any).error.code, 'forbidden');
    } finally {
      await relay.close();
    }
  });

  it("publish: { token } → 403 forbidden without or with a wrong bearer token, 204 with the right one", async () => {
    const r = await startRelay({ publish: { token: 's3cret' } });
    try {
      const s = await openStream(r, 'a');
      const denied: Array<Record<string, string>> = [
        {},
        { authorization: 'Bearer wrong' },
        { authorization: 'Bearer s3cre' },
        { authorization: 'Bearer s3cretX' },
        { authorization: 'Basic s3cret' },
        { authorization: 's3cret' },
        { authorization: 'Bearer ' },
      ];
      for (const headers of denied) assertError(await publish(r, '?topic=a', 'denied', headers), 403, 'forbidden');
      assert.equal((await publish(r, '?topic=a', 'allowed', { authorization: 'Bearer s3cret' })).status, 204);
      await s.until(() => s.messages().length >= 1);
      assert.deepEqual(s.messages().map((m) => m.json.payload), ['allowed']);
      s.close();
    } finally {
      await r.close();
    }
  });

  it('refuses publish: { token: \'\' } (an unset environment variable, say) at creation, rather than opening /publish to requests without a token', async () => {
    for (const token of ['', undefined]) {
      await assert.rejects(createRelay({ broker: `mem://empty-token-${process.pid}`, publish: { token } as { token: string } }), /publish\.token/);
    }
  });

  it('publish: true enables it on any broker', async () => {
    const mem = new MemBroker(`true-${process.pid}-${Math.random()}`);
    const r = await startRelay({ broker: { ...brokerMethods(mem), scheme: 'fake' }, publish: true });
    try {
      assert.equal((await publish(r, '?topic=a', 'x')).status, 204);
    } finally {
      await r.close();
      await mem.close();
    }
  });
});

describe('POST /publish during a broker outage', () => {
  it('answers 503 broker-unavailable, and 204 again once the broker is back', async () => {
    const broker = new MemBroker(`pub-outage-${process.pid}-${Math.random()}`);
    const r = await startRelay({ broker });
    try {
      broker.beginOutage();
      assertError(await publish(r, '?topic=a', 'x'), 503, 'broker-unavailable');
      broker.endOutage();
      assert.equal((await publish(r, '?topic=a', 'x')).status, 204);
    } finally {
      await r.close();
      await broker.close();
    }
  });
});

/** A Broker delegating to `mem`, so a test can give it another scheme. */
function brokerMethods(mem: MemBroker): Broker {
  return {
    scheme: mem.scheme,
    topicProblem: () => undefined,
    subscribe: (topic, listener) => mem.subscribe(topic, listener),
    publish: (topic, body) => mem.publish(topic, body),
    isConnected: () => mem.isConnected(),
    close: () => mem.close(),
  };
}
