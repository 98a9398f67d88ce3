/**
 * PROTOCOL.md section 2.3: a client that stops reading slows down nobody else, its pending output
 * stays bounded, and it learns what it lost. Real sockets: the slow client is an HTTP response
 * that is paused, so its kernel buffers fill and the relay sees backpressure.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import { startRelay, SseReader, type RunningRelay, type SseEvent } from './support/relay.ts';

const MESSAGE_BYTES = 64 * 1024;
const OUTBOX_BYTES = 1024 * 1024;
/** Published per round; the fast reader gets each round before the next, as a reader that keeps up would. */
const ROUND = 8;

/** A 64 KiB body that starts with its index. */
function body(i: number): Buffer {
  const b = Buffer.alloc(MESSAGE_BYTES, 'x');
  b.write(`${i}:`);
  return b;
}

function indexOf(event: SseEvent): number {
  const payload: string = event.json.payload;
  return Number(payload.slice(0, payload.indexOf(':')));
}

async function openSse(r: RunningRelay, query: string, headers: Record<string, string> = {}): Promise<SseReader> {
  const s = await SseReader.open(`${r.base}/events${query}`, headers);
  assert.equal(s.response.statusCode, 200);
  await s.until(() => s.events.length >= 1, 5000, 'config');
  return s;
}

/**
 * The relay-side socket of the request whose URL contains `marker`, to watch what it holds for
 * the client (the relay writes a stream's bytes to its socket once the head is out).
 */
function captureSocket(r: RunningRelay, marker: string): () => Socket {
  let found: Socket | undefined;
  r.server.on('request', (req) => {
    if (req.url?.includes(marker)) found = req.socket;
  });
  return () => {
    assert.ok(found, `no request with ${marker}`);
    return found;
  };
}

/** Publishes messages `from`..`to`-1 on `topic`; every publish must resolve whatever the slow reader does. */
async function publishRange(r: RunningRelay, topic: string, from: number, to: number, fast: SseReader, afterRound?: () => void): Promise<void> {
  for (let i = from; i < to; i += ROUND) {
    const end = Math.min(i + ROUND, to);
    const publishes: Promise<void>[] = [];
    for (let j = i; j < end; j++) publishes.push(r.relay.publish(topic, body(j)));
    await Promise.all(publishes);
    await fast.until(() => fast.messages().length >= end, 10_000, `the fast reader to get message ${end - 1}`);
    afterRound?.();
  }
}

describe('a client that stops reading', () => {
  it('loses its own oldest messages (told with events-lost and a count), while others get everything', { timeout: 120_000 }, async () => {
    const r = await startRelay({ outbox: { maxBytes: OUTBOX_BYTES, maxMessages: 1000 }, history: { maxBytes: OUTBOX_BYTES } });
    try {
      const slowSocket = captureSocket(r, 'who=slow');
      const slow = await openSse(r, '?topics=t&who=slow');
      slow.response.pause();
      const fast = await openSse(r, '?topics=t');

      // 20 MB in 64 KiB messages: far more than the slow socket's kernel buffers hold.
      const total = 320;
      let mostHeld = 0;
      await publishRange(r, 't', 0, total, fast, () => {
        mostHeld = Math.max(mostHeld, slowSocket().writableLength);
      });

      assert.deepEqual(fast.messages().map(indexOf), [...Array(total).keys()], 'the fast reader got every message, in order');
      assert.equal(fast.errors().length, 0);
      const dropped = r.relay.stats().messagesDropped;
      assert.ok(dropped > 0, 'the slow reader fell behind by more than its outbox');
      // What the relay holds for the slow reader beyond its outbox: at most about one outbox-sized write.
      assert.ok(mostHeld <= 2 * OUTBOX_BYTES, `the slow reader's socket held ${mostHeld} bytes`);

      // The slow reader reads again: the gap is announced with its size, then later messages follow.
      slow.response.resume();
      await slow.until(() => slow.errors().length >= 1, 10_000, 'events-lost');
      const later = 5;
      for (let i = total; i < total + later; i++) await r.relay.publish('t', body(i));
      await slow.until(() => slow.messages().at(-1) !== undefined && indexOf(slow.messages().at(-1)!) === total + later - 1, 10_000, 'the later messages');

      // Every message either arrived, in order, or was counted by the events-lost just before the next one.
      let next = 0;
      let counted = 0;
      for (const event of slow.events.slice(1)) {
        if (event.json.error !== undefined) {
          assert.equal(event.json.error.code, 'events-lost');
          assert.ok(Number.isInteger(event.json.error.count) && event.json.error.count > 0, JSON.stringify(event.json.error));
          next += event.json.error.count;
          counted += event.json.error.count;
          continue;
        }
        assert.equal(indexOf(event), next, 'a message missing without an events-lost that counts it');
        assert.ok(event.id, 'message events keep their ids');
        next++;
      }
      assert.equal(next, total + later);
      assert.equal(counted, r.relay.stats().messagesDropped, 'every drop is reported to the client that lost it');
      assert.ok(indexOf(slow.messages().at(-1)!) > indexOf(slow.messages()[0]!));
      slow.close();
      fast.close();
    } finally {
      await r.close();
    }
  });

  it("with outbox.onOverflow 'close' is disconnected, and resumes from history with Last-Event-ID", { timeout: 120_000 }, async () => {
    const r = await startRelay({
      outbox: { maxBytes: OUTBOX_BYTES, maxMessages: 1000, onOverflow: 'close' },
      history: { maxBytes: 64 * 1024 * 1024, maxMessages: 10_000 },
    });
    try {
      const slow = await openSse(r, '?topics=t');
      slow.response.pause();
      const fast = await openSse(r, '?topics=t');

      // Publish until the relay gives up on the slow reader (bounded: 40 MB), then a little more.
      let published = 0;
      while ((r.relay.stats().connections.sse ?? 0) === 2) {
        assert.ok(published < 640, 'the relay never closed the slow reader');
        await publishRange(r, 't', published, published + ROUND, fast);
        published += ROUND;
      }
      await publishRange(r, 't', published, published + ROUND, fast);
      published += ROUND;
      assert.deepEqual(fast.messages().map(indexOf), [...Array(published).keys()]);
      assert.ok(r.relay.stats().messagesDropped > 0);

      // The slow reader gets what was already on its socket, then the end of the stream.
      slow.response.resume();
      await slow.until(() => slow.ended, 10_000, 'the closed stream to end');
      const before = slow.messages().map(indexOf);
      assert.deepEqual(before, [...Array(before.length).keys()], 'a clean prefix, in order');
      assert.ok(before.length < published);
      assert.equal(slow.errors().length, 0);

      // Reconnecting as EventSource does replays the rest from history: nothing lost, nothing twice.
      const lastId = (slow.messages().at(-1) ?? slow.events[0]!).id!;
      const again = await openSse(r, '?topics=t', { 'last-event-id': lastId });
      assert.equal(again.config.resumed, true);
      assert.equal(again.config.session_id, slow.config.session_id);
      await again.until(() => again.messages().length >= published - before.length, 10_000, 'the replay');
      assert.equal(again.errors().length, 0);
      assert.deepEqual([...before, ...again.messages().map(indexOf)], [...Array(published).keys()]);
      again.close();
      fast.close();
    } finally {
      await r.close();
    }
  });
  it('is cut once its socket has taken nothing for stallTimeoutMs, and can still resume its session', { timeout: 60_000 }, async () => {
    const r = await startRelay({ heartbeatMs: 100, outbox: { maxBytes: OUTBOX_BYTES, maxMessages: 1000, stallTimeoutMs: 300 } });
    try {
      const slowSocket = captureSocket(r, 'who=stalled');
      const slow = await openSse(r, '?topics=t&who=stalled');
      const sid = slow.config.session_id;
      slow.response.pause();
      const fast = await openSse(r, '?topics=t');
      // Until the paused socket's kernel buffers are full and the relay sees it take nothing (at most 40 MB).
      let sent = 0;
      for (; !slowSocket().writableNeedDrain && sent < 640; sent += ROUND) await publishRange(r, 't', sent, sent + ROUND, fast);
      assert.ok(slowSocket().writableNeedDrain, 'the stalled socket filled up');
      // Keep publishing while waiting: the kernel may grow the socket's buffer and take a little
      // more, and a dead client's socket stays full only while something keeps arriving for it.
      const deadline = Date.now() + 10_000;
      for (; r.relay.stats().connections.sse !== 1 && Date.now() < deadline; sent += ROUND) {
        await publishRange(r, 't', sent, sent + ROUND, fast);
        await new Promise((res) => setTimeout(res, 50));
      }
      assert.equal(r.relay.stats().connections.sse, 1, 'the stalled connection was cut; the reading one stays');
      assert.equal(r.relay.stats().sessions, 2, 'the stalled client keeps its session for a resume');
      slow.close();
      const again = await openSse(r, `?session_id=${encodeURIComponent(sid)}`);
      assert.equal(again.config.resumed, true);
      again.close();
      fast.close();
    } finally {
      await r.close();
    }
  });
});
