// Prints bench/scaleout.sh's results.jsonl as Markdown tables.
// Usage: node bench/scaleout-summary.ts .bench-out/scaleout/results.jsonl
import { readFileSync } from 'node:fs';

interface Phase {
  name: string;
  target_rate: number;
  subscribers: number;
  publish_rate: number;
  lost: number;
  deliveries_per_s: number;
  p50_ms: number;
  p99_ms: number;
  server_cpu: number;
  server_cpu_each?: number[];
  broker_cpu?: number;
  loadgen_cpu: number;
  other_cpu: number;
  cores_busy: number[];
  delivered: boolean;
  kept_up: boolean;
  repeats: number;
  why_not?: string;
}
interface Counters {
  in_msgs: number;
  out_msgs: number;
  in_bytes: number;
  out_bytes: number;
}
interface NodeFigures {
  messages_in: number;
  messages_out: number;
  sessions: number;
  heap_used: number;
  rss_kb: number;
  peak_rss_kb: number;
}
interface Line {
  mode: string;
  label?: string;
  [key: string]: unknown;
}

const lines = readFileSync(process.argv[2] ?? '.bench-out/scaleout/results.jsonl', 'utf8')
  .split('\n')
  .filter(Boolean)
  .map((l) => JSON.parse(l) as Line);
const out = (s = '') => process.stdout.write(`${s}\n`);
const num = (v: number, digits = 0) => v.toLocaleString('en-US', { maximumFractionDigits: digits });
const sig = (v: number) => (Math.abs(v) >= 100 ? num(v) : num(v, Math.abs(v) >= 10 ? 1 : 2));
function table(head: string[], rows: string[][]): void {
  out(`| ${head.join(' | ')} |`);
  out(`|${head.map(() => '---').join('|')}|`);
  for (const r of rows) out(`| ${r.join(' | ')} |`);
  out();
}
const delta = (a: Counters, b: Counters) => ({ in_msgs: b.in_msgs - a.in_msgs, out_msgs: b.out_msgs - a.out_msgs, in_bytes: b.in_bytes - a.in_bytes, out_bytes: b.out_bytes - a.out_bytes });

for (const m of lines.filter((l) => l.mode === 'machine')) {
  out(`Run ${m.date}: ${m.cpu}, ${m.cores} cores, ${Math.round(Number(m.mem_kb) / 1048576)} GiB, Linux ${m.kernel}; node ${m.node}, ${m.go}, nats-server ${m.nats} at ${m.broker}; livepipe ${m.livepipe}.`);
  out(`Nodes and broker pinned to core ${m.server_cpu}, loadgen to core ${m.loadgen_cpu}. Load average (1, 5 min) before: ${(m.loadavg_before as number[]).join(', ')}.`);
}
for (const m of lines.filter((l) => l.mode === 'end')) out(`Ended ${m.date}; load average after: ${(m.loadavg_after as number[]).join(', ')}.`);
out();

const runs = lines.filter((l) => l.mode === 'fanout');
for (const n of [...new Set(runs.map((r) => r.n as number))]) {
  const rows = runs.filter((r) => r.n === n);
  out(`### ${num(n)} subscribers of one topic, spread over the nodes`);
  out();
  table(
    ['nodes', 'sustained deliveries/s', 'delivered deliveries/s', 'p50 / p99 ms at 100k/s: fixed 5 s; step 2 s', 'nodes cpu at 100k/s: fixed (each); step', 'broker cpu', 'loadgen cpu', 'deliveries per node-core-s: fixed; step', 'msgs each node got from the broker per msg published', 'broker msgs in: published + control; out ÷ (nodes × in)', 'RSS MiB each'],
    rows.map((r) => {
      const phases = r.phases as Phase[];
      const fixed = phases.find((p) => p.name === 'fixed')!;
      // The ladder's step at the fixed phase's rate: the same load again, later in the run.
      const step = phases.find((p) => p.name === 'step' && Math.abs(p.target_rate - fixed.target_rate) < 0.05 * fixed.target_rate);
      const perCore = (p: Phase) => (p.server_cpu > 0 ? num(p.deliveries_per_s / p.server_cpu) : '–');
                  const nodes = r.node_figures as NodeFigures[];
      const published = r.published_total as number;
      const broker = r.broker_before && r.broker_after ? delta(r.broker_before as Counters, r.broker_after as Counters) : undefined;
      const fanIn = nodes.map((f) => sig(f.messages_in / published)).join(' / ');
      // Everything the broker took in that was not a publish on the topic is node-to-node traffic;
      // NATS echoes a node's own broadcasts to it, so each message in goes out once per node.
      const brokerCell = broker ? `${num(published)} + ${num(broker.in_msgs - published)}; ${sig(broker.out_msgs / (nodes.length * broker.in_msgs))}` : '–';
      return [
        String(r.nodes),
        num(r.saturation_deliveries_per_s as number) || 'none',
        num(r.throughput_deliveries_per_s as number),
        `${sig(fixed.p50_ms)} / ${sig(fixed.p99_ms)}${step ? `; ${sig(step.p50_ms)} / ${sig(step.p99_ms)}` : ''}`,
        `${fixed.server_cpu}${fixed.server_cpu_each ? ` (${fixed.server_cpu_each.join(', ')})` : ''}${step ? `; ${step.server_cpu}` : ''}`,
        String(fixed.broker_cpu ?? 0),
        String(fixed.loadgen_cpu),
        `${perCore(fixed)}${step ? `; ${perCore(step)}` : ''}`,
        fanIn,
        brokerCell,
        nodes.map((f) => num(f.rss_kb / 1024)).join(' / '),
      ];
    }),
  );
  out('<details><summary>every step</summary>');
  out();
  table(
    ['nodes', 'phase', 'asked deliveries/s', 'deliveries/s', 'p50 ms', 'p99 ms', 'lost', 'nodes cpu (each)', 'broker cpu', 'loadgen cpu', 'other cpu', 'cores busy', 'kept up'],
    rows.flatMap((r) =>
      (r.phases as Phase[]).map((p) => [
        String(r.nodes),
        p.name,
        num(p.target_rate * p.subscribers),
        num(p.deliveries_per_s),
        sig(p.p50_ms),
        sig(p.p99_ms),
        num(p.lost),
        `${p.server_cpu}${p.server_cpu_each ? ` (${p.server_cpu_each.join(', ')})` : ''}`,
        String(p.broker_cpu ?? 0),
        String(p.loadgen_cpu),
        `${p.other_cpu}${p.repeats ? ` (run ${p.repeats + 1}×)` : ''}`,
        p.cores_busy.join(' / '),
        p.kept_up ? 'yes' : `no: ${p.why_not}`,
      ]),
    ),
  );
  out('</details>');
  out();
  for (const r of rows) {
    const problems = [
      r.streams_dropped ? `${r.streams_dropped} streams dropped` : '',
      r.failed ? `${r.failed} streams failed (${r.first_failure})` : '',
      r.error_events ? `${r.error_events} error events` : '',
      r.first_publish_error ? `publish error: ${r.first_publish_error}` : '',
    ].filter(Boolean);
    if (problems.length > 0) out(`- ${r.nodes} node(s): ${problems.join('; ')}`);
  }
}

const fanin = lines.filter((l) => l.mode === 'fanin');
if (fanin.length > 0) {
  out('### Fan-in: one subscriber per node, messages published straight into NATS: what a node spends per broker message');
  out();
  table(
    ['nodes', 'msg/s asked', 'msg/s sent', 'p50 / p99 ms', 'lost', 'nodes cpu (each)', 'broker cpu', 'µs of node cpu per msg, each node', 'kept up'],
    fanin.flatMap((r) =>
      (r.phases as Phase[]).map((p) => [
        String(r.nodes),
        num(p.target_rate),
        num(p.publish_rate),
        `${sig(p.p50_ms)} / ${sig(p.p99_ms)}`,
        num(p.lost),
        `${p.server_cpu}${p.server_cpu_each ? ` (${p.server_cpu_each.join(', ')})` : ''}`,
        String(p.broker_cpu ?? 0),
        (p.server_cpu_each ?? [p.server_cpu]).map((c) => sig((c / p.publish_rate) * 1e6)).join(' / '),
        p.kept_up ? 'yes' : `no: ${p.why_not}`,
      ]),
    ),
  );
}

for (const r of lines.filter((l) => l.mode === 'records-live')) {
  const [v0, v1, v2, v3] = r.broker as Counters[];
  const [before, held, after] = r.node_figures as [NodeFigures[], NodeFigures[], NodeFigures[]];
  const sessions = r.sessions as number;
  out('### Node-to-node traffic, 3 idle nodes');
  out();
  const rows: string[][] = [];
  if (v0 && v1) {
    const beat = delta(v0, v1);
    rows.push(['heartbeats, 5 s idle', `${sig(beat.in_msgs / 5)} in, ${sig(beat.out_msgs / 5)} out per s`, `${sig(beat.in_bytes / Math.max(1, beat.in_msgs))} B`]);
  }
  if (v1 && v2) {
    const open = delta(v1, v2);
    rows.push([`${num(sessions)} sessions opened on nodes 2 and 3, then closed`, `${sig(open.in_msgs / sessions)} in, ${sig(open.out_msgs / sessions)} out per session`, `${sig(open.in_bytes / Math.max(1, open.in_msgs))} B`]);
  }
  if (v2 && v3) {
    const expiry = delta(v2, v3);
    rows.push([`the ${num(sessions)} sessions expiring (12 s, heartbeats included)`, `${sig(expiry.in_msgs / sessions)} in, ${sig(expiry.out_msgs / sessions)} out per session`, `${sig(expiry.in_bytes / Math.max(1, expiry.in_msgs))} B`]);
  }
  const n1 = (f: NodeFigures[]) => f[0]!;
  // Node 1's CPU (ms) and the time (s) at: heartbeats start, heartbeats end, streams opening,
  // streams closed, expiries done. Idle CPU per second is taken off the two bursts.
  const c = r.node1_cpu as Array<[number, number]> | undefined;
  if (c && c.length === 5) {
    const idlePerS = (c[1]![0] - c[0]![0]) / (c[1]![1] - c[0]![1]);
    const burst = (a: [number, number], b: [number, number]) => ((b[0] - a[0] - idlePerS * (b[1] - a[1])) * 1000) / sessions;
    rows.push(['node 1 CPU (no streams of its own)', `idle with heartbeats: ${sig(idlePerS)} ms/s; per record received: ${sig(burst(c[2]!, c[3]!))} µs (opening), ${sig(burst(c[3]!, c[4]!))} µs (expiring)`, '']);
  }
  table(['what', 'broker messages', 'payload per message in'], rows);
  out(
    `Node 1 (no streams, only the records of the ${num(sessions)} sessions of nodes 2 and 3), heap in use after a full GC: ${num(n1(before).heap_used / 1048576, 2)} → ${num(n1(held).heap_used / 1048576, 2)} MiB while it held the records` +
      ` (${num((n1(held).heap_used - n1(before).heap_used) / sessions)} B per record), ${num(n1(after).heap_used / 1048576, 2)} MiB after they expired.` +
      ` Sessions counted by nodes 2 and 3 while held: ${held.slice(1).map((f) => num(f.sessions)).join(', ')}.`,
  );
  out();
}

for (const r of lines.filter((l) => l.mode === 'records')) {
  const w = r.wire_bytes as Record<string, number>;
  out(
    `Session records in a node's heap, measured with ${num(r.records as number)} records built from \`held\` messages as peers.ts builds them (JSON.parse, zod check, Map; node --expose-gc, one topic, no identity): **${r.heap_bytes_per_record} B per record**, ${r.cpu_us_per_message} µs of CPU per \`held\` message received. ` +
      `Payload sizes: beat ${w.beat} B, hello ${w.hello} B, held (one record, one topic) ${w.held_one_topic} B (+${w.held_per_extra_topic_of_20_chars} B per further 20-character topic), dropped ${w.dropped} B.`,
  );
}
