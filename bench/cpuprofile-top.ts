// Prints where a V8 CPU profile (node --cpu-prof) spent its time: the functions with the most
// self time, and the most inclusive time (self + callees).
// Usage: node bench/cpuprofile-top.ts <file.cpuprofile> [rows]
import { readFileSync } from 'node:fs';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
  children?: number[];
}
interface Profile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
}

const [file, rowsArg] = process.argv.slice(2);
if (file === undefined) {
  process.stderr.write('usage: node bench/cpuprofile-top.ts <file.cpuprofile> [rows]\n');
  process.exit(2);
}
const rows = Number(rowsArg ?? 25);
const profile = JSON.parse(readFileSync(file, 'utf8')) as Profile;
const byId = new Map(profile.nodes.map((n) => [n.id, n]));
const total = profile.samples.length;

function label(n: ProfileNode): string {
  const { functionName, url, lineNumber } = n.callFrame;
  const where = url ? `${url.replace(/^file:\/\/.*?\/(src|dist|node_modules)\//, '$1/')}:${lineNumber + 1}` : '';
  return `${functionName || '(anonymous)'} ${where}`.trim();
}

const self = new Map<string, number>();
for (const n of profile.nodes) self.set(label(n), (self.get(label(n)) ?? 0) + (n.hitCount ?? 0));

// Inclusive: each function counted once per stack even when it recurses.
const inclusive = new Map<string, number>();
function walk(id: number, onStack: Set<string>): number {
  const n = byId.get(id)!;
  let hits = n.hitCount ?? 0;
  const name = label(n);
  const fresh = !onStack.has(name);
  if (fresh) onStack.add(name);
  for (const child of n.children ?? []) hits += walk(child, onStack);
  if (fresh) {
    onStack.delete(name);
    inclusive.set(name, (inclusive.get(name) ?? 0) + hits);
  }
  return hits;
}
walk(profile.nodes[0]!.id, new Set());

const seconds = (profile.endTime - profile.startTime) / 1e6;
const pct = (v: number) => `${((100 * v) / total).toFixed(1).padStart(5)}%`;
process.stdout.write(`${file}: ${total} samples over ${seconds.toFixed(1)}s\n\nself time\n`);
for (const [name, v] of [...self].sort((a, b) => b[1] - a[1]).slice(0, rows)) process.stdout.write(`${pct(v)}  ${name}\n`);
process.stdout.write('\ninclusive time\n');
for (const [name, v] of [...inclusive].sort((a, b) => b[1] - a[1]).slice(0, rows)) process.stdout.write(`${pct(v)}  ${name}\n`);
