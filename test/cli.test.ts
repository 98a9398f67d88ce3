import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { pathToFileURL } from 'node:url';
import { isLoopbackHost, parseCli, serverPolicy, UsageError } from '../src/server/args.ts';
import { ensureBuilt, LivepipeProcess, parseRecords, ROOT, runLivepipe, within } from './support/livepipe.ts';
import { post } from './support/relay.ts';

describe('livepipe flags (parseCli)', () => {
  it('defaults to the in-memory broker on 127.0.0.1:8080', () => {
    assert.deepEqual(parseCli([], {}), { kind: 'serve', config: { host: '127.0.0.1', port: 8080, broker: 'mem://' } });
  });

  it('reads PORT and HOST, and flags win over them', () => {
    assert.deepEqual(parseCli([], { PORT: '9000', HOST: '::1' }), { kind: 'serve', config: { host: '::1', port: 9000, broker: 'mem://' } });
    assert.deepEqual(parseCli(['--port', '9001', '--host', 'localhost', '--broker', 'mem://demo'], { PORT: 'junk', HOST: '10.0.0.1' }), {
      kind: 'serve',
      config: { host: 'localhost', port: 9001, broker: 'mem://demo' },
    });
    assert.deepEqual(parseCli(['-p', '0', '--host=[::1]'], {}), { kind: 'serve', config: { host: '::1', port: 0, broker: 'mem://' } });
  });

  it('names the bad flag in a UsageError', () => {
    assert.throws(() => parseCli(['--prot', '1'], {}), (err: unknown) => err instanceof UsageError && err.message.startsWith('--prot: unknown flag'));
    assert.throws(() => parseCli([], { PORT: '80x' }), (err: unknown) => err instanceof UsageError && err.message.startsWith('PORT: "80x" is not a port'));
  });
});

describe('loopback, CORS and publish decision', () => {
  it('treats 127.0.0.0/8, ::1 and localhost as loopback, and nothing else', () => {
    for (const host of ['127.0.0.1', '127.1.2.3', '::1', '[::1]', '0:0:0:0:0:0:0:1', '::ffff:127.0.0.1', 'localhost', 'LOCALHOST']) {
      assert.equal(isLoopbackHost(host), true, host);
    }
    for (const host of ['0.0.0.0', '::', '10.0.0.1', '128.0.0.1', '::2', '1::1', 'example.com', 'localhost.example.com', '127.0.0.1.nip.io']) {
      assert.equal(isLoopbackHost(host), false, host);
    }
  });

  it('allows any origin on loopback only, and HTTP publish only for mem:// on loopback', () => {
    assert.deepEqual(serverPolicy({ host: '127.0.0.1', broker: 'mem://' }), { cors: { origins: '*' }, publish: true });
    assert.deepEqual(serverPolicy({ host: 'localhost', broker: 'nats://127.0.0.1:4222' }), { cors: { origins: '*' }, publish: false });
    assert.deepEqual(serverPolicy({ host: '0.0.0.0', broker: 'mem://' }), { cors: false, publish: false });
    assert.deepEqual(serverPolicy({ host: '192.168.1.20', broker: 'nats://broker' }), { cors: false, publish: false });
  });
});

describe('livepipe server (the built bin)', () => {
  let lp: LivepipeProcess;
  let base: string;
  before(async () => {
    ensureBuilt();
    lp = new LivepipeProcess(['--port', '0']);
    ({ base } = await lp.started());
  });
  after(() => lp.kill());

  it('logs one start record naming the address and the broker', () => {
    assert.match(base, /^http:\/\/127\.0\.0\.1:\d+$/);
    assert.notEqual(base, 'http://127.0.0.1:0');
    const records = parseRecords(lp.stdout);
    assert.equal(records.length, 1, lp.stdout);
    assert.equal(records[0]!.level, 'info');
    assert.equal(records[0]!.msg, `livepipe listening on ${base} (broker mem://)`);
    assert.deepEqual([records[0]!.url, records[0]!.broker], [base, 'mem://']);
    assert.equal(lp.stderr, '');
  });

  it('answers /healthz, /readyz and /metrics', async () => {
    const health = await fetch(`${base}/healthz`);
    assert.equal(health.status, 200);
    assert.deepEqual(await health.json(), { status: 'ok' });
    const ready = await fetch(`${base}/readyz`);
    assert.equal(ready.status, 200);
    assert.equal(((await ready.json()) as { status: string }).status, 'ready');
    const metrics = await fetch(`${base}/metrics`);
    assert.equal(metrics.status, 200);
    assert.match(metrics.headers.get('content-type') ?? '', /^text\/plain/);
    assert.match(await metrics.text(), /^# HELP /m);
  });

  it('serves the demo page at / with its assets, and a JSON 404 elsewhere', async () => {
    const page = await fetch(`${base}/`);
    assert.equal(page.status, 200);
    assert.equal(page.headers.get('content-type'), 'text/html; charset=utf-8');
    const html = await page.text();
    assert.match(html, /<title>livepipe demo<\/title>/);
    assert.match(html, /src="demo\.js"/);
    const js = await fetch(`${base}/demo.js`);
    assert.equal(js.status, 200);
    assert.equal(js.headers.get('content-type'), 'text/javascript; charset=utf-8');
    assert.equal(await js.text(), readFileSync(`${ROOT}public/demo.js`, 'utf8'));
    assert.equal((await fetch(`${base}/demo.css`)).headers.get('content-type'), 'text/css; charset=utf-8');
    for (const path of ['/nope', '/nope/', '/%2e%2e/package.json', '/..%2fpackage.json', '/%E0%A4%A']) {
      const res = await fetch(`${base}${path}`);
      assert.equal(res.status, 404, path);
      assert.equal(res.headers.get('content-type'), 'application/json; charset=utf-8', path);
      assert.equal(((await res.json()) as { error: { code: string } }).error.code, 'not-found', path);
    }
  });

  it('lets any origin use the endpoints on loopback, preflight included', async () => {
    const health = await fetch(`${base}/healthz`, { headers: { origin: 'http://example.test' } });
    assert.equal(health.headers.get('access-control-allow-origin'), '*');
    const preflight = await fetch(`${base}/update_subscriptions`, {
      method: 'OPTIONS',
      headers: { origin: 'http://example.test', 'access-control-request-method': 'POST', 'access-control-request-headers': 'content-type' },
    });
    assert.equal(preflight.status, 204);
    assert.equal(preflight.headers.get('access-control-allow-origin'), '*');
    assert.match(preflight.headers.get('access-control-allow-headers') ?? '', /content-type/i);
  });

  it('exits 0 on SIGINT', async () => {
    assert.deepEqual(await lp.stop('SIGINT'), { code: 0, signal: null });
    assert.match(lp.stdout, /shutting down \(SIGINT\)/);
  });
});

describe('livepipe with curl', () => {
  before(() => ensureBuilt());

  it('streams to `curl -N`, and on SIGTERM ends the open stream cleanly and exits 0', async () => {
    const lp = new LivepipeProcess(['--port', '0']);
    let proc: ChildProcess | undefined;
    let out = '';
    try {
      const { base } = await lp.started();
      proc = spawn('curl', ['--silent', '--show-error', '-N', '--max-time', '30', `${base}/events?topics=news`], { stdio: ['ignore', 'pipe', 'pipe'] });
      const curlExit = new Promise<number | null>((resolve) => proc!.once('close', (code) => resolve(code)));
      proc.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
      const until = async (pattern: RegExp, what: string) => {
        const deadline = Date.now() + 10_000;
        while (!pattern.test(out)) {
          if (Date.now() > deadline) throw new Error(`curl never received ${what}; got:\n${out}`);
          await new Promise((resolve) => setTimeout(resolve, 25));
        }
      };

      await until(/\n\n/, 'the config event');
      const config = JSON.parse(/^data: (.*)$/m.exec(out)![1]!) as { topic: string; payload: { session_id: string; subscriptions: string[] } };
      assert.equal(config.topic, '/httpsub/config');
      assert.deepEqual(config.payload.subscriptions, ['news']);
      assert.match(out, /^retry: \d+$/m);

      assert.equal((await post(`${base}/publish?topic=news`, 'hello curl', {})).status, 204);
      await until(/data: \{"topic":"news","payload":"hello curl"\}\n\n/, 'the published message');
      assert.match(out, new RegExp(`^id: ${config.payload.session_id}\\.\\d+\\ndata: \\{"topic":"news"`, 'm'));

      assert.deepEqual(await lp.stop('SIGTERM'), { code: 0, signal: null });
      // curl exits 0 only when the chunked response was properly terminated, not cut off.
      assert.equal(await within(curlExit, 10_000, 'curl to exit'), 0);
      assert.match(lp.stdout, /shutting down \(SIGTERM\)/);
      assert.equal(lp.stderr, '');
    } finally {
      proc?.kill();
      await lp.kill();
    }
  });
});

describe('livepipe flag errors', () => {
  before(() => ensureBuilt());

  const cases: Array<{ args: string[]; env?: Record<string, string>; names: string; why: RegExp }> = [
    { args: ['--verbose'], names: '--verbose', why: /unknown flag/ },
    { args: ['-x'], names: '-x', why: /unknown flag/ },
    { args: ['--conf', 'livepipe.yaml'], names: '--conf', why: /unknown flag/ },
    { args: ['--config'], names: '--config', why: /needs a value/ },
    { args: ['serve'], names: '"serve"', why: /unexpected argument/ },
    { args: ['--port'], names: '--port', why: /needs a value/ },
    { args: ['--port', '--host', '127.0.0.1'], names: '--port', why: /needs a value/ },
    { args: ['--port', 'eighty'], names: '--port', why: /not a port number/ },
    { args: ['--port', '-1'], names: '--port', why: /needs a value/ },
    { args: ['--port', '65536'], names: '--port', why: /out of range/ },
    { args: ['--port', '8080.5'], names: '--port', why: /not a port number/ },
    { args: ['--host', ''], names: '--host', why: /empty/ },
    { args: ['--broker', 'not a url'], names: '--broker', why: /not a URL/ },
    { args: ['--broker', 'carrierpigeon://loft'], names: '--broker', why: /no broker driver for carrierpigeon:\/\/ \(known: .*mem:\/\//s },
    { args: ['--help=yes'], names: '--help', why: /takes no value/ },
    { args: [], env: { PORT: 'http' }, names: 'PORT', why: /not a port number/ },
    { args: [], env: { PORT: '99999' }, names: 'PORT', why: /out of range/ },
  ];
  for (const { args, env, names, why } of cases) {
    it(`exits 2 for ${args.length ? args.map((a) => JSON.stringify(a)).join(' ') : JSON.stringify(env)}`, async () => {
      const result = await runLivepipe(args, env);
      assert.equal(result.code, 2, result.stderr);
      assert.equal(result.stdout, '');
      const lines = result.stderr.split('\n');
      assert.equal(lines.length, 2, `one line then the final newline:\n${result.stderr}`);
      assert.ok(lines[0]!.startsWith(`livepipe: ${names}`), lines[0]);
      assert.match(lines[0]!, why);
    });
  }
});

describe('livepipe start-up', () => {
  before(() => ensureBuilt());

  it('listens where PORT and HOST say', async () => {
    const port = await freePort('127.0.0.2');
    const lp = new LivepipeProcess([], { PORT: String(port), HOST: '127.0.0.2' });
    try {
      const { base } = await lp.started();
      assert.equal(base, `http://127.0.0.2:${port}`);
      assert.equal((await fetch(`${base}/healthz`)).status, 200);
      // 127.0.0.0/8 is loopback: publishing over HTTP is on.
      assert.equal((await post(`${base}/publish?topic=t`, 'x', {})).status, 204);
      assert.deepEqual(await lp.stop(), { code: 0, signal: null });
    } finally {
      await lp.kill();
    }
  });

  it('lets --port and --host win over PORT and HOST', async () => {
    // Neither of these could be listened on here; the flags must replace them.
    const lp = new LivepipeProcess(['--port', '0', '--host', '127.0.0.1'], { PORT: 'not-a-port', HOST: '192.0.2.1' });
    try {
      const { base } = await lp.started();
      assert.match(base, /^http:\/\/127\.0\.0\.1:\d+$/);
      assert.deepEqual(await lp.stop(), { code: 0, signal: null });
    } finally {
      await lp.kill();
    }
  });

  it('exits 1 with one clear line when the broker cannot be opened', async () => {
    // A driver registered before the CLI runs, on the very registry dist/ uses, that fails like an unreachable server.
    const registry = pathToFileURL(`${ROOT}dist/index.js`).href;
    const failing = `data:text/javascript,import { registerBroker } from ${JSON.stringify(registry)}; registerBroker('unreachable', async () => { throw new Error('connect ECONNREFUSED 127.0.0.1:1') });`;
    const result = await runLivepipe(['--broker', 'unreachable://user:secret@127.0.0.1:1', '--port', '0'], {}, ['--import', failing]);
    assert.equal(result.code, 1, result.stdout);
    assert.equal(result.stderr, '');
    const records = parseRecords(result.stdout);
    assert.deepEqual(
      records.map((r) => [r.level, r.msg]),
      [['fatal', 'cannot open the broker unreachable://user:***@127.0.0.1:1: connect ECONNREFUSED 127.0.0.1:1']],
    );
    assert.ok(!result.stdout.includes('secret'));
  });

  it('exits 1 with one clear line when the port is taken', async () => {
    const taken = createServer();
    await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
    try {
      const port = (taken.address() as { port: number }).port;
      const result = await runLivepipe(['--port', String(port)]);
      assert.equal(result.code, 1, result.stdout);
      const records = parseRecords(result.stdout);
      assert.equal(records.length, 1, result.stdout);
      assert.equal(records[0]!.level, 'fatal');
      assert.match(records[0]!.msg, new RegExp(`^cannot listen on 127\\.0\\.0\\.1:${port}: .*EADDRINUSE`));
    } finally {
      await close(taken);
    }
  });

  it('prints help and the version', async () => {
    const help = await runLivepipe(['--help']);
    assert.equal(help.code, 0);
    for (const flag of ['--port', '--host', '--broker', '--help', '--version', 'PORT', 'HOST', 'mem://']) assert.ok(help.stdout.includes(flag), flag);
    const version = await runLivepipe(['--version']);
    assert.equal(version.code, 0);
    assert.equal(version.stdout, `${(JSON.parse(readFileSync(`${ROOT}package.json`, 'utf8')) as { version: string }).version}\n`);
  });
});

async function freePort(host: string): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, host, resolve));
  const { port } = server.address() as { port: number };
  await close(server);
  return port;
}

function close(server: Server): Promise<void> {
  return new Promise((resolve) => server.close(() => resolve()));
}
