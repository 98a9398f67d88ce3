/**
 * The bytes of an SSE stream on node:http, as HTTP/1.0 and HTTP/1.1 clients see them on the
 * wire: the relay writes a stream straight to its socket once the head is out (src/http/node.ts),
 * so framing, the end of the stream and the server's connection handling are checked here.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import { RawClient, dechunk } from './support/raw-client.ts';
import { startRelay, SseReader } from './support/relay.ts';

async function eventually(predicate: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 5000;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

for (const fast of [false, true]) {
  describe(`SSE on the wire (${fast ? 'streams served before node:http' : 'node:http, socket taken over'})`, () => {
    it('HTTP/1.1: a chunked stream with the section 2 headers and Connection: close, ended by the last chunk and then the connection', async () => {
      const r = await startRelay({ cors: { origins: '*' } }, { fast });
      try {
        const c = await RawClient.open(r, 'GET /events?topics=a HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n\r\n');
        await c.until(() => c.body.includes('/httpsub/config'), 'the config event');
        assert.match(c.head, /^HTTP\/1\.1 200 OK\r\n/);
        assert.equal(c.header('content-type'), 'text/event-stream; charset=utf-8');
        assert.equal(c.header('cache-control'), 'no-cache, no-transform');
        assert.equal(c.header('x-accel-buffering'), 'no');
        assert.equal(c.header('access-control-allow-origin'), '*');
        assert.equal(c.header('transfer-encoding'), 'chunked');
        assert.equal(c.header('connection'), 'close');

        await r.relay.publish('a', 'hello');
        await c.until(() => dechunk(c.body).data.includes('"payload":"hello"'), 'the message');
        await r.relay.close({ reconnectDelayMs: 10 });
        await c.until(() => c.closed, 'the connection to close');
        const { data, complete } = dechunk(c.body);
        assert.equal(complete, true, 'the body ends with the last chunk');
        assert.match(data, /retry: \d+\n\n$/, 'the reconnect hint is the last thing sent');
      } finally {
        await r.close();
      }
    });

    it('HTTP/1.0: the events as they are, no chunks, the end of the body is the end of the connection', async () => {
      const r = await startRelay({}, { fast });
      try {
        const c = await RawClient.open(r, 'GET /events?topics=a HTTP/1.0\r\n\r\n');
        await c.until(() => c.body.includes('/httpsub/config'), 'the config event');
        assert.match(c.head, /^HTTP\/1\.1 200 OK\r\n/);
        assert.equal(c.header('transfer-encoding'), undefined);
        assert.equal(c.header('connection'), 'close');
        assert.match(c.body, /^retry: \d+\nid: [^\n]+\ndata: \{"topic":"\/httpsub\/config"/);

        await r.relay.publish('a', 'hello');
        await c.until(() => c.body.includes('"payload":"hello"'), 'the message');
        await r.relay.close();
        await c.until(() => c.ended && c.closed, 'the connection to end');
        assert.match(c.body, /"payload":"hello"\}\n\n$/);
      } finally {
        await r.close();
      }
    });

    it('notices a client that leaves, and a client that only ends its side', async () => {
      const r = await startRelay({}, { fast });
      try {
        const gone = await RawClient.open(r, 'GET /events?topics=a HTTP/1.1\r\nHost: x\r\n\r\n');
        const halfClosed = await RawClient.open(r, 'GET /events?topics=a HTTP/1.1\r\nHost: x\r\n\r\n');
        await gone.until(() => gone.body.includes('/httpsub/config'), 'the config event');
        await halfClosed.until(() => halfClosed.body.includes('/httpsub/config'), 'the config event');
        assert.equal(r.relay.stats().connections.sse, 2);
        gone.socket.destroy();
        await eventually(() => r.relay.stats().connections.sse === 1, 'the relay to notice the client that left');
        halfClosed.socket.end();
        await halfClosed.until(() => halfClosed.closed, 'the relay to close the half-closed connection');
        await eventually(() => (r.relay.stats().connections.sse ?? 0) === 0, 'the relay to notice the half-closed one');
        assert.equal(r.relay.stats().sessions, 2, 'both sessions wait for a resume');
      } finally {
        await r.close();
      }
    });

    it('a reader whose socket fills gets every frame intact: small frames are framed in a shared slab, never reused while a write holds it', { timeout: 60_000 }, async () => {
      const r = await startRelay({ outbox: { maxMessages: 100_000, maxBytes: 64 * 1024 * 1024 } }, { fast });
      // 1 KiB bodies, each telling its index, so that any overwritten byte shows.
      const payload = (i: number) => `${i}:${String.fromCharCode(97 + (i % 26)).repeat(1000)}`;
      try {
        const sockets: Socket[] = [];
        r.server.on('connection', (socket: Socket) => sockets.push(socket));
        // The slow reader first: in each flush its write comes before the fast reader's, which would overwrite a slab it still held.
        const slow = await SseReader.open(`${r.base}/events?topics=a`);
        await slow.until(() => slow.events.length >= 1, 5000, 'config');
        slow.response.pause();
        const fastReader = await SseReader.open(`${r.base}/events?topics=a`);
        await fastReader.until(() => fastReader.events.length >= 1, 5000, 'config');
        // 40 MB: more than the paused reader's kernel buffers take, so some write to it is taken only in part.
        const total = 40_000;
        let held = 0;
        for (let i = 0; i < total; i += 200) {
          // One message per event-loop turn, so that each is a small frame of its own (a turn's messages leave as one batch).
          for (let j = i; j < i + 200; j++) {
            await r.relay.publish('a', payload(j));
            await new Promise((resolve) => setImmediate(resolve));
          }
          await fastReader.until(() => fastReader.messages().length >= i + 200, 10_000, `the fast reader to get message ${i + 199}`);
          held = Math.max(held, sockets[0]!.writableLength);
        }
        assert.ok(held > 0, "the slow reader's socket filled");
        slow.response.resume();
        await slow.until(() => slow.messages().length >= total, 30_000, 'the slow reader to catch up');
        assert.equal(slow.errors().length, 0, 'nothing dropped: the outbox holds it all');
        assert.deepEqual(
          slow.messages().map((m, i) => m.json.payload === payload(i)),
          Array.from({ length: total }, () => true),
        );
        slow.close();
        fastReader.close();
      } finally {
        await r.close();
      }
    });

    it("server.closeAllConnections() cuts open streams, as it cuts node:http's own responses", async () => {
      const r = await startRelay({}, { fast });
      try {
        const s = await SseReader.open(`${r.base}/events?topics=a`);
        await s.until(() => s.events.length >= 1, 5000, 'config');
        r.server.closeAllConnections();
        await s.until(() => s.ended, 5000, 'the stream to be cut');
        await eventually(() => (r.relay.stats().connections.sse ?? 0) === 0, 'the relay to notice');
      } finally {
        await r.close();
      }
    });

  });
}

describe('SSE on the wire (node:http only)', () => {
  it("a listener on the response (a request logger) hears the stream end: 'finish' and 'close' when the relay ends it, 'close' alone when the client leaves", async () => {
    const r = await startRelay();
    const heard: Array<{ url: string | undefined; events: string[]; finished?: boolean }> = [];
    r.server.prependListener('request', (req, res) => {
      const record: (typeof heard)[number] = { url: req.url, events: [] };
      heard.push(record);
      res.on('finish', () => record.events.push('finish'));
      res.on('close', () => {
        record.events.push('close');
        record.finished = res.writableFinished;
      });
    });
    try {
      const leaving = await SseReader.open(`${r.base}/events?topics=a&who=leaving`);
      const staying = await SseReader.open(`${r.base}/events?topics=a&who=staying`);
      await leaving.until(() => leaving.events.length >= 1, 5000, 'config');
      await staying.until(() => staying.events.length >= 1, 5000, 'config');
      leaving.close();
      await eventually(() => heard[0]!.events.length > 0, "the leaving stream's close");
      assert.deepEqual(heard[0], { url: '/events?topics=a&who=leaving', events: ['close'], finished: false });
      await r.relay.close();
      await staying.until(() => staying.ended, 5000, 'the end of the stream');
      await eventually(() => heard[1]!.events.length > 1, "the staying stream's close");
      assert.deepEqual(heard[1], { url: '/events?topics=a&who=staying', events: ['finish', 'close'], finished: true });
    } finally {
      await r.close();
    }
  });
});
