import { connect } from 'node:net';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';

const run = promisify(execFile);
const BROKERS_SCRIPT = fileURLToPath(new URL('../../scripts/brokers.sh', import.meta.url));
const EMULATORS_SCRIPT = fileURLToPath(new URL('../../scripts/cloud-emulators.sh', import.meta.url));

/** Why a broker server cannot be reached at host:port, or undefined when it answers. */
export function unreachable(name: string, host: string, port: number, timeoutMs = 1500): Promise<string | undefined> {
  return new Promise((resolve) => {
    const socket = connect({ host, port });
    const done = (why: string | undefined) => {
      socket.destroy();
      resolve(why);
    };
    socket.setTimeout(timeoutMs, () => done(`${name} did not answer on ${host}:${port} within ${timeoutMs} ms`));
    socket.once('connect', () => done(undefined));
    socket.once('error', (err) => done(`${name} is not reachable on ${host}:${port} (${(err as NodeJS.ErrnoException).code ?? err.message})`));
  });
}

/** Restarts one test broker through scripts/brokers.sh (used by the reconnect conformance test). */
export async function restartBroker(name: string): Promise<void> {
  await run('bash', [BROKERS_SCRIPT, 'down', name], { timeout: 120_000 });
  await run('bash', [BROKERS_SCRIPT, 'up', name], { timeout: 180_000 });
}

/** Restarts one cloud emulator through scripts/cloud-emulators.sh; being in memory, it loses every resource. */
export async function restartEmulator(name: string): Promise<void> {
  await run('bash', [EMULATORS_SCRIPT, 'down', name], { timeout: 60_000 });
  await run('bash', [EMULATORS_SCRIPT, 'up', name], { timeout: 300_000 });
}

/**
 * The `skip` option for a broker's own test group: skipped with the reason on a developer's
 * machine without the server, never in CI, where an unreachable broker must fail the run.
 */
export function skipUnlessCi(unavailable: string | undefined): string | false {
  if (unavailable === undefined || process.env.CI) return false;
  return `${unavailable} (start the test servers with: scripts/brokers.sh up && scripts/cloud-emulators.sh up)`;
}
