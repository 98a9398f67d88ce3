/** Test helper: Debian's nginx as a plain round-robin load balancer (no sticky sessions) in front of livepipe nodes on loopback. */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { readFileSync, rmSync } from 'node:fs';
import { get } from 'node:http';
import { createServer, type AddressInfo } from 'node:net';
import { randomUUID } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const NGINX = '/usr/sbin/nginx';

export interface RunningNginx {
  /** e.g. http://127.0.0.1:40123 */
  url: string;
  port: number;
  /** Graceful stop (SIGQUIT), SIGKILL after 2 s; removes the temp dir. */
  stop(): Promise<void>;
}

/** Starts nginx balancing over 127.0.0.1:`upstreamPorts`; resolves once it accepts connections. */
export async function startNginx(upstreamPorts: number[]): Promise<RunningNginx> {
  if (upstreamPorts.length === 0) throw new Error('startNginx needs at least one upstream port');
  // The free port is released before nginx binds it, so another process may take it meanwhile: try again then.
  for (let attempt = 1; ; attempt++) {
    const dir = await mkdtemp(join(tmpdir(), 'livepipe-nginx-'));
    try {
      return await launch(dir, await freePort(), upstreamPorts);
    } catch (error) {
      await rm(dir, { recursive: true, force: true });
      if (!(error instanceof AddressInUse) || attempt >= 5) throw error;
    }
  }
}

class AddressInUse extends Error {}

/** Answered by nginx itself, never proxied: how startNginx knows this nginx is the one listening. */
const READY_PATH = '/.startNginx-ready';

function config(dir: string, port: number, upstreamPorts: number[], token: string): string {
  // Every path nginx writes is under `dir`: it must never touch /var/log/nginx, /var/lib/nginx or /run.
  return `
${process.getuid?.() === 0 ? 'user root;' : ''}
# One worker: round-robin order and max_fails state are per worker, so tests see strict alternation.
worker_processes 1;
# A graceful stop would otherwise wait for every open event stream to end.
worker_shutdown_timeout 1s;
pid ${dir}/nginx.pid;
lock_file ${dir}/nginx.lock;
error_log ${dir}/error.log info;

events {
  worker_connections 4096;
}

http {
  access_log off;
  client_body_temp_path ${dir}/client_body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;

  map $http_upgrade $connection_upgrade {
    default upgrade;
    '' close;
  }

  upstream livepipe {
    # Plain round-robin: no ip_hash, no sticky. A node that refuses a connection is skipped for 2 s.
${upstreamPorts.map((p) => `    server 127.0.0.1:${p} max_fails=1 fail_timeout=2s;`).join('\n')}
  }

  server {
    listen 127.0.0.1:${port};

    # The relay applies its own body limit (maxBodyBytes), not nginx's default 1 MiB.
    client_max_body_size 0;

    location = ${READY_PATH} {
      return 200 '${token}';
    }

    location / {
      proxy_pass http://livepipe;
      proxy_next_upstream error timeout;
      proxy_connect_timeout 5s;

      # Server-Sent Events and WebSocket: unbuffered, long-lived, upgradable.
      proxy_http_version 1.1;
      proxy_buffering off;
      proxy_cache off;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
      send_timeout 1h;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;

      proxy_set_header Host $http_host;
      proxy_set_header Last-Event-ID $http_last_event_id;
      # Replaced, not appended, as options.ts's trustProxy asks.
      proxy_set_header X-Forwarded-For $remote_addr;
    }
  }
}
`;
}

async function launch(dir: string, port: number, upstreamPorts: number[]): Promise<RunningNginx> {
  const conf = join(dir, 'nginx.conf');
  const errorLog = join(dir, 'error.log');
  const token = randomUUID();
  await writeFile(conf, config(dir, port, upstreamPorts, token));
  const child = spawn(NGINX, ['-p', `${dir}/`, '-c', conf, '-e', errorLog, '-g', 'daemon off;'], { stdio: ['ignore', 'ignore', 'pipe'] });
  // nginx logs startup errors to the -e file and to stderr; stderr alone has them when the file cannot be written.
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  let spawnError: Error | undefined;
  child.once('error', (error) => (spawnError = error));
  // 'exit', not 'close': workers inherit stderr, so 'close' would also wait for them.
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  // nginx outlives its parent: a test process that exits without stop() (a crash, process.exit) must not leave it running.
  const onExit = () => {
    killNow(child);
    rmSync(dir, { recursive: true, force: true });
  };
  process.once('exit', onExit);
  void exited.then(() => process.off('exit', onExit));

  const state = await accepting(port, token, () => spawnError === undefined && running(child), 10_000);
  if (state !== 'up') {
    await kill(child, exited);
    const log = (await readFile(errorLog, 'utf8').catch(() => '')) || stderr;
    const why = spawnError ? `could not be started (${spawnError.message}; apt-get install nginx-light)` : state === 'exited' ? `exited early (code ${child.exitCode})` : 'did not accept connections within 10 s';
    const message = `nginx ${why}; error log:\n${log}`;
    throw log.includes('Address already in use') ? new AddressInUse(message) : new Error(message);
  }

  return {
    url: `http://127.0.0.1:${port}`,
    port,
    async stop() {
      if (running(child)) {
        child.kill('SIGQUIT');
        const timer = setTimeout(() => void kill(child, exited), 2_000);
        await exited;
        clearTimeout(timer);
      }
      await rm(dir, { recursive: true, force: true });
    },
  };
}

function running(child: ChildProcess): boolean {
  return child.exitCode === null && child.signalCode === null;
}

/** SIGKILL to the master and its workers: a worker outlives a killed master and keeps serving. */
async function kill(child: ChildProcess, exited: Promise<void>): Promise<void> {
  killNow(child);
  await exited;
}

function killNow(child: ChildProcess): void {
  if (!running(child)) return;
  let workers: number[] = [];
  try {
    workers = readFileSync(`/proc/${child.pid}/task/${child.pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    // no /proc: only the master can be killed
  }
  child.kill('SIGKILL');
  for (const pid of workers) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/**
 * Polls the readiness location until nginx answers with this run's token (a bare TCP connect could
 * reach another process that took the port while nginx retries its bind), nginx is gone, or `ms` passed.
 */
async function accepting(port: number, token: string, alive: () => boolean, ms: number): Promise<'up' | 'exited' | 'timeout'> {
  const deadline = Date.now() + ms;
  for (;;) {
    const body = await new Promise<string>((resolve) => {
      const req = get({ host: '127.0.0.1', port, path: READY_PATH, agent: false, timeout: 1_000 }, (res) => {
        let text = '';
        res.setEncoding('utf8').on('data', (d: string) => (text += d));
        res.on('end', () => resolve(text));
        res.on('error', () => resolve(''));
      });
      req.on('timeout', () => req.destroy());
      req.on('error', () => resolve(''));
    });
    if (!alive()) return 'exited';
    if (body === token) return 'up';
    if (Date.now() > deadline) return 'timeout';
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}
