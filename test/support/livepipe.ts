/** Test helpers for the `livepipe` command: runs the built bin (bin/livepipe.js → dist/) as a child process. */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Waiter } from './wait.ts';

export const ROOT = fileURLToPath(new URL('../../', import.meta.url));
export const BIN = `${ROOT}bin/livepipe.js`;

/** `npm test` builds first; a single test file run by hand builds dist when it is missing. */
export function ensureBuilt(): void {
  // The demo page imports the browser client, which has a build of its own (npm run build does both).
  if (!existsSync(`${ROOT}dist/client/index.js`)) {
    execFileSync(process.execPath, [`${ROOT}node_modules/typescript/bin/tsc`, '-p', `${ROOT}client/tsconfig.json`], { stdio: 'inherit' });
  }
  if (existsSync(`${ROOT}dist/server/cli.js`)) return;
  try {
    execFileSync(process.execPath, [`${ROOT}node_modules/typescript/bin/tsc`, '-p', `${ROOT}tsconfig.build.json`], { stdio: 'inherit' });
  } catch {
    // tsc emits despite type errors elsewhere; only a missing output matters here.
  }
  if (!existsSync(`${ROOT}dist/server/cli.js`)) throw new Error('npm run build did not produce dist/server/cli.js');
}

/** The environment for a child: ours without PORT / HOST (which would change its address) plus `extra`. */
function childEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env = { ...process.env };
  delete env.PORT;
  delete env.HOST;
  delete env.NODE_TEST_CONTEXT; // set by node --test; a child node must not think it is a test runner's
  return { ...env, ...extra };
}

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** A running `livepipe` process with its output so far. */
export class LivepipeProcess {
  readonly child: ChildProcess;
  stdout = '';
  stderr = '';
  readonly exited: Promise<Exit>;
  private readonly waiter = new Waiter();

  constructor(args: string[], env: Record<string, string> = {}, nodeArgs: string[] = []) {
    this.child = spawn(process.execPath, [...nodeArgs, BIN, ...args], { cwd: ROOT, env: childEnv(env), stdio: ['ignore', 'pipe', 'pipe'] });
    this.child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      this.stdout += d;
      this.wake();
    });
    this.child.stderr!.setEncoding('utf8').on('data', (d: string) => {
      this.stderr += d;
      this.wake();
    });
    this.exited = new Promise((resolve) => this.child.once('close', (code, signal) => resolve({ code, signal })));
    void this.exited.then(() => this.wake());
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /**
   * Waits for the start record (`{"level":"info",…,"msg":"livepipe listening on <url> (broker <url>)","url":…}`);
   * returns the base URL it names (with the real port), the broker, and the record's line.
   */
  async started(ms = 10_000): Promise<{ base: string; broker: string; line: string }> {
    const find = () => parseRecords(this.stdout, false).find((r) => typeof r.msg === 'string' && r.msg.startsWith('livepipe listening on '));
    await this.until(() => find() !== undefined || !this.running, ms, 'the start record');
    const record = find();
    if (record === undefined) throw new Error(`livepipe did not start; stdout:\n${this.stdout}\nstderr:\n${this.stderr}`);
    const line = this.stdout.split('\n').find((l) => l.includes('"livepipe listening on '))!;
    return { base: record.url, broker: record.broker, line };
  }

  /** The JSON log records on stdout so far (complete lines only). */
  records(): LogRecord[] {
    return parseRecords(this.stdout);
  }

  /** Sends `signal` and waits for the process to exit. */
  async stop(signal: NodeJS.Signals = 'SIGTERM', ms = 15_000): Promise<Exit> {
    if (this.running) this.child.kill(signal);
    return within(this.exited, ms, `livepipe to exit after ${signal}`);
  }

  /** Cleanup: ends the process whatever its state. */
  async kill(): Promise<void> {
    if (this.running) this.child.kill('SIGKILL');
    await this.exited;
  }

  private until(predicate: () => boolean, ms: number, what: string): Promise<void> {
    return this.waiter.until(predicate, ms, () => new Error(`timed out waiting for ${what}; stdout:\n${this.stdout}\nstderr:\n${this.stderr}`));
  }

  private wake(): void {
    this.waiter.wake();
  }
}

/** A JSON log record of livepipe (pino): `level` is the level's name. */
export interface LogRecord {
  level: string;
  time: string;
  msg: string;
  [key: string]: any;
}

/**
 * The JSON records among the complete lines of `output`. When `strict`, a line that is not one
 * throws (every stdout line of the server is a record); otherwise it is skipped.
 */
export function parseRecords(output: string, strict = true): LogRecord[] {
  const lines = output.split('\n');
  lines.pop(); // the part after the last newline: empty, or a line still being written
  const records: LogRecord[] = [];
  for (const line of lines) {
    try {
      records.push(JSON.parse(line) as LogRecord);
    } catch {
      if (strict) throw new Error(`not a JSON log record: ${line}`);
    }
  }
  return records;
}

/** Runs livepipe to completion (for flags that make it exit at once). */
export async function runLivepipe(args: string[], env: Record<string, string> = {}, nodeArgs: string[] = []): Promise<Exit & { stdout: string; stderr: string }> {
  const p = new LivepipeProcess(args, env, nodeArgs);
  try {
    const exit = await within(p.exited, 10_000, `livepipe ${args.join(' ')} to exit`);
    return { ...exit, stdout: p.stdout, stderr: p.stderr };
  } finally {
    await p.kill();
  }
}

/** Rejects when `promise` takes longer than `ms`, so a hang fails the test instead of stalling the run. */
export async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${ms}ms waiting for ${what}`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
