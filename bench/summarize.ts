// Prints the benchmark's results.jsonl (one JSON line per run, written by bench/run.sh) as
// readable tables. Usage: node bench/summarize.ts .bench-out/results.jsonl
import { readFileSync } from 'node:fs';

interface Phase {
  name: string;
  target_rate: number;
  subscribers: number;
  publish_rate: number;
  received: number;
  lost: number;
  late: number;
  duplicated: number;
  deliveries_per_s: number;
  p50_ms: number;
  p90_ms: number;
  p99_ms: number;
  max_ms: number;
  events_lost_reported: number;
  server_cpu: number;
  loadgen_cpu: number;
  other_cpu: number;
  cores_busy: number[];
  server_writes_per_delivery: number;
  kept_up: boolean;
  repeats: number;
  why_not?: string;
}

interface Line {
  mode: string;
  label?: string;
  [key: string]: unknown;
}

const file = process.argv[2] ?? '.bench-out/results.jsonl';
const lines = readFileSync(file, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as Line);
const out = (s = '') => process.stdout.write(`${s}\n`);
const num = (v: unknown) => (typeof v === 'number' ? v.toLocaleString('en-US') : String(v));

function table(head: string[], rows: string[][]): void {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const row = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i]!)).join(' | ')} |`;
  out(row(head));
  out(`|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`);
  for (const r of rows) out(row(r));
}

for (const line of lines) {
  if (line.mode === 'machine') {
    out(`${line.date}: ${line.cpu}, ${line.cores} cores, ${Math.round(Number(line.mem_kb) / 1048576)} GiB, node ${line.node}, ${line.go}, relay: ${line.server}, load before: ${line.loadavg_1m_before}`);
  } else if (line.mode === 'fanout') {
    const phases = line.phases as Phase[];
    out();
    out(`fan-out to ${num(line.n)} subscribers (${num(line.connected)} connected in ${line.connect_s}s, ${num(line.streams_dropped)} dropped, ${num(line.messages_without_id)} messages without id)`);
    table(
      ['phase', 'msg/s asked', 'msg/s sent', 'deliveries/s', 'p50 ms', 'p90 ms', 'p99 ms', 'max ms', 'lost', 'dup', 'late', 'relay cpu', 'loadgen cpu', 'other cpu', 'cores busy', 'relay writes/delivery', 'kept up'],
      phases.map((p) => [
        p.name,
        p.target_rate ? num(p.target_rate) : 'as fast as delivered',
        num(p.publish_rate),
        num(p.deliveries_per_s),
        num(p.p50_ms),
        num(p.p90_ms),
        num(p.p99_ms),
        num(p.max_ms),
        num(p.lost),
        num(p.duplicated),
        num(p.late),
        num(p.server_cpu),
        num(p.loadgen_cpu),
        num(p.other_cpu),
        (p.cores_busy ?? []).join(' / '),
        num(p.server_writes_per_delivery),
        p.kept_up ? 'yes' : `no: ${p.why_not ?? ''}`,
      ]),
    );
    for (const p of phases) {
      const which = `${p.name}${p.target_rate ? ` ${p.target_rate} msg/s` : ''}`;
      if (p.loadgen_cpu >= 0.9) out(`note: the loadgen used ${p.loadgen_cpu} of its core in ${which}: that phase may measure the loadgen rather than the relay`);
      if (p.repeats > 0) out(`note: ${which} was run ${p.repeats + 1} times: other processes took CPU during the earlier attempts`);
      if (p.other_cpu > 0.3) out(`note: other processes used ${p.other_cpu} cores during ${which}: its figures are disturbed`);
    }
    out(`saturation (every delivery arrived, p99 ≤ 100 ms): ${num(line.saturation_deliveries_per_s)} deliveries/s (${num(line.saturation_rate)} msg/s × ${num(line.n)})`);
    out(`throughput (every delivery arrived, any latency): ${num(line.throughput_deliveries_per_s)} deliveries/s (${num(line.throughput_rate)} msg/s); the first step past it still delivered ${num(line.overload_deliveries_per_s)}/s`);
    out(`relay RSS ${num(Math.round(Number(line.server_rss_kb) / 1024))} MiB (peak ${num(Math.round(Number(line.server_peak_rss_kb) / 1024))} MiB)`);
  } else if (line.mode === 'idle') {
    out();
    out(`idle: ${num(line.connected)} of ${num(line.n)} connections open (${num(line.still_open)} still open at the end, connected in ${line.connect_s}s)`);
    out(`  relay RSS ${num(line.server_rss_before_kb)} kB → ${num(line.server_rss_after_kb)} kB: ${num(line.server_rss_per_conn_bytes)} bytes per connection`);
    out(`  V8 heap used ${num(line.server_heap_used_before_bytes)} → ${num(line.server_heap_used_after_bytes)} bytes: ${num(line.server_heap_per_conn_bytes)} bytes per connection`);
  }
}
