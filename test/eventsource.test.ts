/**
 * The relay with the `eventsource` npm client (the WHATWG EventSource for Node): events arrive as
 * MessageEvents with ids, a dropped connection resumes by itself through Last-Event-ID with
 * nothing lost or repeated, the `retry:` delay is used, and a gochan page's flow works unchanged.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { EventSource, type FetchLike } from 'eventsource';
import { startRelay, type RunningRelay } from './support/relay.ts';

const RETRY_MS = 137; // small, and unlike any other delay in play, so the reconnect timer is recognisable

async function waitFor(predicate: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

const parse = (event: MessageEvent) => JSON.parse(event.data);
const isConfig = (event: MessageEvent) => parse(event).topic === '/httpsub/config';
const seqOf = (id: string) => Number(id.slice(id.lastIndexOf('.') + 1));

for (const fast of [false, true]) {
  describe(`the eventsource client (${fast ? 'streams served before node:http' : 'node:http'})`, () => {
    let r: RunningRelay;
    before(async () => {
      r = await startRelay({ retryMs: RETRY_MS }, { fast });
    });
    after(() => r.close());

    it('gets config and messages as MessageEvents whose lastEventId is set', async () => {
      const es = new EventSource(`${r.base}/events?topics=news`);
      const events: MessageEvent[] = [];
      es.onmessage = (event) => void events.push(event);
      try {
        await waitFor(() => events.length >= 1, 'the config event');
        const config = parse(events[0]!);
        assert.ok(events[0] instanceof MessageEvent);
        assert.equal(config.topic, '/httpsub/config');
        const sid: string = config.payload.session_id;
        assert.deepEqual(config.payload.subscriptions, ['news']);
        assert.equal(config.payload.resumed, false);
        assert.match(events[0]!.lastEventId, new RegExp(`^${sid}\\.\\d+$`));

        await r.relay.publish('news', 'first');
        await r.relay.publish('news', 'second');
        await waitFor(() => events.length >= 3, 'two messages');
        assert.deepEqual(events.slice(1).map(parse), [
          { topic: 'news', payload: 'first' },
          { topic: 'news', payload: 'second' },
        ]);
        const ids = events.map((e) => e.lastEventId);
        assert.ok(ids.every((id) => id.startsWith(`${sid}.`)));
        assert.ok(seqOf(ids[1]!) > seqOf(ids[0]!) && seqOf(ids[2]!) > seqOf(ids[1]!), `ids increase: ${ids.join(' ')}`);
      } finally {
        es.close();
      }
    });

    it('reconnects by itself after a dropped connection and resumes: same session, each missed message once, in order', async (t) => {
      // Watch the client's timers: the reconnect must wait the relay's retry: delay, not the client's default (3 s).
      const timers = t.mock.method(globalThis, 'setTimeout');
      // The client's own fetch, recording its requests, and holding back the reconnect until the
      // test has published during the gap (so those messages can only arrive by replay).
      const requests: Array<Record<string, string>> = [];
      let openGate!: () => void;
      const gate = new Promise<void>((resolve) => (openGate = resolve));
      const gatedFetch: FetchLike = async (url, init) => {
        requests.push(init.headers);
        if (requests.length > 1) await gate;
        return fetch(url, init);
      };
      const es = new EventSource(`${r.base}/events?topics=a,b`, { fetch: gatedFetch });
      const events: MessageEvent[] = [];
      let errors = 0;
      let callsAtError = -1;
      es.onmessage = (event) => void events.push(event);
      es.onerror = () => {
        errors++;
        callsAtError = timers.mock.callCount();
      };
      const payloads = () => events.filter((e) => !isConfig(e)).map((e) => parse(e).payload);
      try {
        await waitFor(() => events.length >= 1, 'the config event');
        const first = parse(events[0]!).payload;
        assert.equal(requests[0]!['Last-Event-ID'], undefined);

        await r.relay.publish('a', 'before-1');
        await r.relay.publish('b', 'before-2');
        await waitFor(() => payloads().length >= 2, 'the messages before the drop');
        const lastSeen = events.at(-1)!.lastEventId;

        // Drop the connection from the server side, then publish while the client is away.
        r.server.closeAllConnections();
        await r.relay.publish('a', 'gap-1');
        await waitFor(() => requests.length >= 2, 'the client to reconnect');
        assert.equal(errors, 1);
        await r.relay.publish('b', 'gap-2');
        await r.relay.publish('a', 'gap-3');
        await r.relay.publish('elsewhere', 'not subscribed');
        openGate();

        await waitFor(() => events.filter(isConfig).length >= 2, 'the config event of the resumed stream');
        assert.equal(requests[1]!['Last-Event-ID'], lastSeen);
        const resumed = parse(events.filter(isConfig)[1]!).payload;
        assert.equal(resumed.resumed, true);
        assert.equal(resumed.session_id, first.session_id);
        assert.deepEqual(resumed.subscriptions, ['a', 'b']);

        await r.relay.publish('b', 'after-1');
        await waitFor(() => payloads().includes('after-1'), 'a message after the resume');
        assert.deepEqual(payloads(), ['before-1', 'before-2', 'gap-1', 'gap-2', 'gap-3', 'after-1']);
        assert.equal(events.filter((e) => parse(e).error !== undefined).length, 0, 'no error events');
        const seqs = events.filter((e) => !isConfig(e)).map((e) => seqOf(e.lastEventId));
        assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y));
        assert.equal(new Set(seqs).size, seqs.length);

        // The client arms its reconnect timer right after firing `error`: that timer waited retry: ms.
        assert.equal(timers.mock.calls[callsAtError]!.arguments[1], RETRY_MS);
      } finally {
        openGate();
        es.close();
      }
    });

    it('runs a gochan page unchanged', async () => {
      // What a page written for gochan does: the first event's payload holds the session id, which
      // it POSTs to update_subscriptions (a fetch string body, so text/plain); messages are {topic, payload}.
      const received: Array<{ topic: string; payload: string }> = [];
      let sessionId: string | undefined;
      let subscribed: any;
      const es = new EventSource(`${r.base}/events?topics=chat`);
      es.onmessage = (event) => {
        const msg = JSON.parse(event.data);
        if (sessionId === undefined) {
          sessionId = msg.payload.session_id;
          void fetch(`${r.base}/update_subscriptions`, {
            method: 'POST',
            body: JSON.stringify({ session_id: sessionId, add: ['alerts'], remove: [] }),
          }).then(async (res) => (subscribed = { status: res.status, body: await res.json() }));
          return;
        }
        received.push({ topic: msg.topic, payload: msg.payload });
      };
      try {
        await waitFor(() => subscribed !== undefined, 'the page to add a topic');
        assert.equal(subscribed.status, 200);
        assert.deepEqual(subscribed.body.subscriptions, ['chat', 'alerts']);
        await r.relay.publish('chat', 'hello');
        await r.relay.publish('alerts', '{"level":"high"}');
        await waitFor(() => received.length >= 2, 'two messages');
        assert.deepEqual(received, [
          { topic: 'chat', payload: 'hello' },
          { topic: 'alerts', payload: '{"level":"high"}' },
        ]);
      } finally {
        es.close();
      }
    });

    it('runs the README browser snippet', async () => {
      // The README's page code, with the relay's origin in front of its relative URLs.
      const base = r.base;
      const shown: Array<[string, unknown]> = [];
      const show = (topic: string, payload: unknown) => void shown.push([topic, payload]);
      const warnings: string[] = [];
      let subscribed: Promise<string[]> | undefined;
      // --- snippet ---
      const source = new EventSource(`${base}/events?topics=chat`);
      let sessionId: string | undefined;

      source.onmessage = (event) => {
        const msg = JSON.parse(event.data);
        if (msg.topic === '/httpsub/config') {
          // First event of every connection. resumed: false means a new session (its topics are the URL's).
          sessionId = msg.payload.session_id;
          if (!msg.payload.resumed) subscribed = subscribe(['alerts']); // the README adds .catch(console.error)
          return;
        }
        if (msg.error) return void warnings.push(`${msg.error.code}: ${msg.error.message}`); // console.warn in the README
        show(msg.topic, msg.payload);
      };

      async function subscribe(add: string[], remove: string[] = []): Promise<string[]> {
        const res = await fetch(`${base}/update_subscriptions`, {
          method: 'POST',
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ session_id: sessionId, add, remove }),
        });
        const body: any = await res.json();
        if (!res.ok) throw new Error(`${body.error.code}: ${body.error.message}`);
        return body.subscriptions;
      }
      // --- end of snippet ---
      try {
        await waitFor(() => subscribed !== undefined, 'the config event');
        assert.deepEqual(await subscribed, ['chat', 'alerts']);
        await r.relay.publish('alerts', 'fire');
        await r.relay.publish('chat', 'hi');
        await waitFor(() => shown.length >= 2, 'two messages');
        assert.deepEqual(shown, [['alerts', 'fire'], ['chat', 'hi']]);
        await assert.rejects(subscribe(['/httpsub/no']), /^Error: invalid-topic: /);
        assert.deepEqual(await subscribe([], ['chat']), ['alerts']);
        assert.deepEqual(warnings, []);
      } finally {
        source.close();
      }
    });
  });
}
