import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { isUtf8 } from 'node:buffer';
import pg from 'pg';
import { describeConformance, Collector, freshTopic, rejectsWith, openDriver } from './conformance.ts';
import { restartBroker, skipUnlessCi, unreachable } from './availability.ts';
import { openBroker } from '../../src/brokers/index.ts';
import { MAX_BINARY_BODY_BYTES, PostgresBroker } from '../../src/brokers/postgres.ts';

const PG_URL = process.env.LIVEPIPE_POSTGRES_URL ?? 'postgres://postgres:postgres@127.0.0.1:5432/livepipe_test';
const server = new URL(PG_URL);
const unavailable = await unreachable('Postgres', server.hostname, Number(server.port || 5432));

// The broker's own client, used directly. A pool, so that it outlives the server restart.
const raw = new pg.Pool({ connectionString: PG_URL, max: 2 });
raw.on('error', () => {});
after(() => raw.end());

/** What another application sends: plain text, or the driver's documented base64 envelope. */
function foreignPayload(body: Uint8Array): string {
  const bytes = Buffer.from(body);
  const text = bytes.toString('utf8');
  return isUtf8(bytes) && !bytes.includes(0) && !text.startsWith('\u0001base64:') ? text : `\u0001base64:${bytes.toString('base64')}`;
}

async function notify(topic: string, payload: string): Promise<void> {
  await raw.query(`NOTIFY ${pg.escapeIdentifier(topic)}, ${pg.escapeLiteral(payload)}`);
}

const openPostgres = (url = PG_URL): Promise<PostgresBroker> => openDriver(url, PostgresBroker);

describeConformance({
  name: 'postgres (LISTEN/NOTIFY)',
  unavailable,
  open: () => openPostgres(),
  publishExternally: (topic, body) => notify(topic, foreignPayload(body)),
  maxBodyBytes: MAX_BINARY_BODY_BYTES, // the conformance body ends in random bytes, so it travels as base64
  unrepresentableTopics: ['x'.repeat(64), 'é'.repeat(32)],
  // Sessions of the closed driver (its listening connection and publishing pool) by application_name.
  async leftovers(closed) {
    const name = (closed as PostgresBroker).applicationName;
    let pids: number[] = [];
    // A backend leaves pg_stat_activity a moment after its client hung up.
    for (let i = 0; i < 20; i++) {
      const { rows } = await raw.query<{ pid: number }>('SELECT pid FROM pg_stat_activity WHERE application_name = $1', [name]);
      pids = rows.map((r) => r.pid);
      if (pids.length === 0) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    return pids.map((pid) => `connection ${name} (pid ${pid})`);
  },
  restartServer: () => restartBroker('postgres'),
});

describe('postgres driver', { skip: skipUnlessCi(unavailable) }, () => {
  it('takes any topic up to 63 bytes as a quoted channel name', async () => {
    const broker = await openPostgres();
    try {
      const id = freshTopic('t');
      // Ü and ï take two bytes each: 61 UTF-16 units make 63 bytes.
      const topics = [`Orders.${id}`, `orders.${id}`, `a"b c'd.${id}`, `Ünï.${id}`.padEnd(61, 'X'), `x.${id}`.padEnd(63, '.')];
      assert.equal(Buffer.byteLength(topics[3]!), 63);
      assert.equal(Buffer.byteLength(topics[4]!), 63);
      const collectors = new Map<string, Collector>();
      for (const topic of topics) {
        assert.equal(broker.topicProblem(topic), undefined, topic);
        const c = new Collector();
        await broker.subscribe(topic, c);
        collectors.set(topic, c);
      }
      // Through the driver (pg_notify) and through a plain NOTIFY statement: the same channels.
      for (const topic of topics) {
        await broker.publish(topic, Buffer.from(`driver ${topic}`));
        await notify(topic, `raw ${topic}`);
      }
      for (const [topic, c] of collectors) {
        await c.until(() => c.bodies.length === 2, 5000, `two messages on ${topic}`);
        assert.deepEqual(c.texts(), [`driver ${topic}`, `raw ${topic}`], 'case and quotes must keep channels apart');
      }
      assert.match(broker.topicProblem('x'.repeat(64)) ?? '', /at most 63 bytes \(NAMEDATALEN - 1; this one is 64\)/);
      await assert.rejects(broker.publish('x'.repeat(64), Buffer.from('x')), rejectsWith('invalid-topic', /63 bytes/));
    } finally {
      await broker.close();
    }
  });

  it('hands text NOTIFYs of other clients over unchanged, and decodes the base64 envelope', async () => {
    const broker = await openPostgres();
    try {
      const topic = freshTopic();
      const c = new Collector();
      await broker.subscribe(topic, c);
      const texts = ['plain', 'ünïcødé ✓ 🎉', '{"json": true}', 'tab\tand\u0001control', '\u0001base64:not base64!', '', 'y'.repeat(7999)];
      for (const text of texts) await notify(topic, text);
      const binary = Buffer.from([0xff, 0, 1, 0xc3, 0x28]);
      await notify(topic, `\u0001base64:${binary.toString('base64')}`);
      await c.until(() => c.bodies.length === texts.length + 1, 5000, 'every notification');
      assert.deepEqual(c.texts().slice(0, texts.length), texts);
      assert.ok(c.bodies[texts.length]!.equals(binary));
    } finally {
      await broker.close();
    }
  });

  it('publishes text as is and other bodies in the base64 envelope, byte for byte', async () => {
    const broker = await openPostgres();
    const spy = new pg.Client(PG_URL); // a plain LISTEN session shows what goes over the wire
    await spy.connect();
    try {
      const topic = freshTopic();
      const seen: string[] = [];
      spy.on('notification', (n) => seen.push(n.payload ?? ''));
      await spy.query(`LISTEN ${pg.escapeIdentifier(topic)}`);
      const c = new Collector();
      await broker.subscribe(topic, c);
      const bodies = [Buffer.from('text ✓'), Buffer.from('nul\0inside'), Buffer.from([0xfe, 0xff]), Buffer.from('\u0001base64:aGk='), Buffer.alloc(7999, 'z')];
      for (const body of bodies) await broker.publish(topic, body);
      await c.until(() => c.bodies.length === bodies.length, 5000, 'every body');
      for (const [i, body] of bodies.entries()) assert.ok(c.bodies[i]!.equals(body), `body ${i} changed`);
      for (let i = 0; seen.length < bodies.length && i < 50; i++) await new Promise((r) => setTimeout(r, 100)); // the spy's own connection
      assert.deepEqual(seen.slice(0, 4), ['text ✓', '\u0001base64:bnVsAGluc2lkZQ==', '\u0001base64:/v8=', '\u0001base64:AWJhc2U2NDphR2s9']);
    } finally {
      await spy.end();
      await broker.close();
    }
  });

  it('rejects a body over the NOTIFY limit with too-large', async () => {
    const broker = await openPostgres();
    try {
      const topic = freshTopic();
      await assert.rejects(broker.publish(topic, Buffer.alloc(8000, 'z')), rejectsWith('too-large', /at most 7999 bytes; this body needs 8000/));
      await assert.rejects(broker.publish(topic, Buffer.alloc(MAX_BINARY_BODY_BYTES + 1, 0)), rejectsWith('too-large', /at most 5991 bytes for a body that is not UTF-8 text/));
    } finally {
      await broker.close();
    }
  });

  it('names its sessions by application_name (what the leftovers check looks for)', async () => {
    const broker = await openPostgres();
    try {
      await broker.subscribe(freshTopic(), new Collector());
      await broker.publish(freshTopic(), Buffer.from('x'));
      const { rows } = await raw.query<{ n: number }>('SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = $1', [broker.applicationName]);
      assert.equal(rows[0]!.n, 2, 'the listening connection and the publishing connection');
    } finally {
      await broker.close();
    }
  });

  it('rejects a client_encoding other than UTF-8 with bad-request', async () => {
    await assert.rejects(openBroker(`${PG_URL}?client_encoding=LATIN1`), rejectsWith('bad-request', /client_encoding="LATIN1" is not supported/));
    const broker = await openPostgres(`${PG_URL.replace(/^postgres:/, 'postgresql:')}?client_encoding=UTF8&application_name=mine`);
    await broker.close();
  });

  it('fails to open, with broker-unavailable, when nothing listens', async () => {
    await assert.rejects(openBroker('postgres://postgres:postgres@127.0.0.1:1/x'), rejectsWith('broker-unavailable', /cannot connect to Postgres: .*ECONNREFUSED/));
  });
});
