// What one session record costs a scaled-out node (src/scaleout/peers.ts keeps one per session
// of every other node), measured the way a node builds them: each record arrives as its own
// `held` message on the broker, is parsed with JSON.parse, checked by a zod schema of the same
// shape as peers.ts's, and kept in a Map. Heap per record, CPU per message received, and the
// size on the wire of each kind of node-to-node message. Prints one JSON line.
//   node --expose-gc bench/scaleout-records.ts [records=1000000]
import { randomBytes } from 'node:crypto';
import { z } from 'zod';

const gc = (globalThis as { gc?: () => void }).gc;
if (gc === undefined) throw new Error('run with node --expose-gc');
const count = Number(process.argv[2] ?? 1_000_000);

// Ids as peers.ts makes them: base64url of a 6-byte node tag and 16 random bytes (30 characters).
const node = randomBytes(6).toString('base64url');
const sessionId = () => node + randomBytes(16).toString('base64url');
const wire = (body: object) => Buffer.from(JSON.stringify({ ...body, from: node }));

const sizes = {
  beat: wire({ t: 'beat' }).length,
  hello: wire({ t: 'hello' }).length,
  held_one_topic: wire({ t: 'held', records: [{ id: sessionId(), topics: ['bench'] }] }).length,
  held_per_extra_topic_of_20_chars: wire({ t: 'held', records: [{ id: sessionId(), topics: ['bench', 'x'.repeat(20)] }] }).length - wire({ t: 'held', records: [{ id: sessionId(), topics: ['bench'] }] }).length,
  dropped: wire({ t: 'dropped', id: sessionId() }).length,
};

const heapUsed = () => {
  gc();
  gc();
  return process.memoryUsage().heapUsed;
};
// peers.ts's ENVELOPE, reduced to the one message kind measured here.
const text = z.string();
const ENVELOPE = z.intersection(
  z.discriminatedUnion('t', [z.object({ t: z.literal('held'), records: z.array(z.object({ id: text, topics: z.array(text), identity: text.optional() })) })]),
  z.object({ from: text }),
);

const messages = Array.from({ length: count }, () => wire({ t: 'held', records: [{ id: sessionId(), topics: ['bench'] }] }));
const records = new Map<string, { owner: string; topics: string[]; identity: string | undefined }>();
const started = process.cpuUsage();
for (const bytes of messages) {
  const message = ENVELOPE.parse(JSON.parse(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('utf8')));
  for (const r of message.records) records.set(r.id, { owner: message.from, topics: r.topics, identity: r.identity });
}
const cpu = process.cpuUsage(started);
// What the Map holds is what clearing it frees. (Measured by release: V8 frees a variable as
// soon as the code no longer reads it, so `messages` is read again below to stay alive.)
const held = heapUsed();
const size = records.size;
records.clear();
const freed = held - heapUsed();
console.log(
  JSON.stringify({
    mode: 'records',
    records: size,
    messages_alive: messages.length,
    heap_bytes_per_record: Math.round(freed / size),
    // GC included; the Map's growth too, which a node pays once.
    cpu_us_per_message: +((cpu.user + cpu.system) / count).toFixed(2),
    wire_bytes: sizes,
    node: process.version,
  }),
);
