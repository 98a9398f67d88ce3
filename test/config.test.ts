import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parse } from 'yaml';
import { parseCli, printConfig, relayOptions, usage, UsageError, type ServerConfig } from '../src/server/args.ts';
import { configKeyPaths } from '../src/server/config.ts';
import { ensureBuilt, LivepipeProcess, ROOT, runLivepipe } from './support/livepipe.ts';
import { post, SseReader } from './support/relay.ts';

const EXAMPLE = `${ROOT}livepipe.example.yaml`;
const SECRET = 'an HS256 secret of at least thirty-two bytes';

let dir: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), 'livepipe-config-'));
});
after(() => rmSync(dir, { recursive: true, force: true }));

let files = 0;
/** Writes a config file and returns its path. */
function configFile(yaml: string): string {
  const file = join(dir, `config-${++files}.yaml`);
  writeFileSync(file, yaml);
  return file;
}

function serve(argv: string[], env: NodeJS.ProcessEnv = {}): ServerConfig {
  const command = parseCli(argv, env);
  assert.equal(command.kind, 'serve');
  return (command as { config: ServerConfig }).config;
}

/** The UsageError message parseCli throws. */
function refusal(argv: string[], env: NodeJS.ProcessEnv = {}): string {
  try {
    parseCli(argv, env);
  } catch (err) {
    assert.ok(err instanceof UsageError, String(err));
    return err.message;
  }
  assert.fail(`parseCli accepted ${argv.join(' ')}`);
}

describe('invalid config files exit 2 with one line naming the key path and the rule', () => {
  before(() => ensureBuilt());

  const cases: Array<{ kind: string; yaml?: string; file?: string; env?: Record<string, string>; line: RegExp }> = [
    { kind: 'unknown key at the top level', yaml: 'port: 0\nprot: 8080\n', line: /: prot: unknown key \(known: host, port, broker,/ },
    { kind: 'unknown nested key', yaml: 'limits:\n  maxConnectionPerIp: 3\n', line: /: limits\.maxConnectionPerIp: unknown key \(known: maxConnectionsPerIp, / },
    { kind: 'wrong type', yaml: 'heartbeatMs: soon\n', line: /: heartbeatMs: expected a duration in ms, .*, got "soon"$/ },
    { kind: 'out-of-range number', yaml: 'limits:\n  updateRate: { perSecond: 0, burst: 5 }\n', line: /: limits\.updateRate\.perSecond: expected a positive number, got 0$/ },
    { kind: 'port out of range', yaml: 'port: 70000\n', line: /: port: expected a port number from 0 to 65535, got 70000$/ },
    { kind: 'missing required key', yaml: 'tls:\n  cert: cert.pem\n', line: /: tls\.key: missing \(expected a PEM file path\)$/ },
    { kind: 'bad enum', yaml: 'outbox:\n  onOverflow: explode\n', line: /: outbox\.onOverflow: expected one of drop-oldest, close, got "explode"$/ },
    { kind: 'bad broker scheme', yaml: 'broker: carrierpigeon://loft\n', line: /: broker: no broker driver for carrierpigeon:\/\/ \(known: .*mem:\/\//s },
    { kind: 'broker that is not a URL', yaml: 'broker: not a url\n', line: /: broker: expected a broker URL, e\.g\. mem:\/\// },
    { kind: 'bad list item', yaml: 'cors:\n  origins:\n    - https://app.example.com\n    - https://app.example.com/\n', line: /: cors\.origins\[1\]: expected an origin: scheme:\/\/host\[:port\]/ },
    { kind: 'rule across keys', yaml: `auth:\n  jwt:\n    secret: "${SECRET}"\n    jwksUrl: https://auth.example.com/jwks\n`, line: /: auth\.jwt: needs exactly one of secret, publicKey or jwksUrl \(got secret and jwksUrl\)$/ },
    { kind: 'YAML syntax error', yaml: 'port: 0\ncors:\n  origins: [https://a.example.com\n', line: /: line 4, column 1: invalid YAML: / },
    { kind: 'duplicate key', yaml: 'port: 0\nport: 1\n', line: /: line 2, column 1: invalid YAML: Map keys must be unique$/ },
    { kind: 'unset ${VAR}', yaml: 'auth:\n  jwt:\n    secret: ${LIVEPIPE_TEST_UNSET}\n', line: /: auth\.jwt\.secret: environment variable LIVEPIPE_TEST_UNSET is not set \(set it, or give a default: \$\{LIVEPIPE_TEST_UNSET:-value\}\)$/ },
    { kind: 'not a mapping', yaml: '- port: 0\n', line: /: top level: expected a mapping of keys, got a list$/ },
    { kind: 'missing file', file: 'no-such-livepipe.yaml', line: /^livepipe: config no-such-livepipe\.yaml: cannot read the file \(no such file\)$/ },
  ];
  for (const { kind, yaml, file, env, line } of cases) {
    it(kind, async () => {
      const path = file ?? configFile(yaml!);
      const result = await runLivepipe(['--config', path], env);
      assert.equal(result.code, 2, result.stderr);
      assert.equal(result.stdout, '');
      const lines = result.stderr.split('\n');
      assert.equal(lines.length, 2, `one line then the final newline:\n${result.stderr}`);
      assert.ok(lines[0]!.startsWith(`livepipe: config ${path}: `), lines[0]);
      assert.match(lines[0]!, line);
    });
  }

  it('never echoes a secret in the message', () => {
    const message = refusal(['--config', configFile('auth:\n  jwt:\n    secret: hunter2\n')]);
    assert.match(message, /auth\.jwt\.secret: expected a secret of at least 32 bytes/);
    assert.doesNotMatch(message, /hunter2/);
    assert.doesNotMatch(refusal(['--config', configFile('broker: carrier://u:hunter2@loft\n')]), /hunter2/);
    const url = refusal(['--config', configFile('auth:\n  callout:\n    url: ftp://u:hunter2@app.example.com/authorize\n')]);
    assert.match(url, /auth\.callout\.url: expected an http:\/\/ or https:\/\/ URL, got "ftp:\/\/u:\*\*\*@app\.example\.com\/authorize"$/);
  });

  it('refuses bad values of the new flags the same way, naming the flag', async () => {
    assert.equal(refusal(['--workers', 'four']), '--workers: expected a whole number of at least 1, got "four"');
    assert.equal(refusal(['--workers', '0']), '--workers: expected a whole number of at least 1, got 0');
    assert.equal(refusal(['--log-level', 'loud']), '--log-level: expected one of fatal, error, warn, info, debug, trace, silent, got "loud"');
    assert.match(refusal(['--shutdown-timeout', '1.5']), /^--shutdown-timeout: expected a duration in ms, /);
    assert.match(refusal(['--tls-cert', 'cert.pem']), /^--tls-cert: needs a private key as well/);
    assert.match(refusal(['--http2']), /^--http2: needs TLS/);
    assert.match(refusal(['--config', configFile('http2: true\n')]), /: http2: needs TLS/);
    const result = await runLivepipe(['--workers', 'four']);
    assert.equal(result.code, 2);
    assert.equal(result.stderr, 'livepipe: --workers: expected a whole number of at least 1, got "four"\n');
  });
});

describe('${ENV} interpolation', () => {
  it('replaces ${VAR} and ${VAR:-default}; unquoted values take the type their text reads as', () => {
    const file = configFile(
      [
        'port: ${LP_PORT}',
        'broker: ${LP_BROKER:-mem://fallback}',
        'heartbeatMs: ${LP_HEARTBEAT:-250}',
        'embedJsonPayloads: ${LP_EMBED}',
        'publish:',
        '  token: "${LP_TOKEN}"', // quoted: stays a string though it reads as a number
        'cors:',
        '  origins: ["https://${LP_DOMAIN}", "https://admin.${LP_DOMAIN}:${LP_ADMIN_PORT:-8443}"]',
        'auth:',
        '  anonymous:',
        '    subscribe: ["$${literal}", "${LP_EMPTY:-public}/*"]',
        '',
      ].join('\n'),
    );
    const env = { LP_PORT: '9001', LP_EMBED: 'true', LP_TOKEN: '12345', LP_DOMAIN: 'example.com', LP_EMPTY: '' };
    const config = serve(['--config', file], env);
    assert.equal(config.port, 9001);
    assert.equal(config.broker, 'mem://fallback');
    assert.deepEqual(config.relay, {
      heartbeatMs: 250,
      embedJsonPayloads: true,
      publish: { token: '12345' },
      cors: { origins: ['https://example.com', 'https://admin.example.com:8443'] },
      auth: { anonymous: { subscribe: ['${literal}', 'public/*'] } },
    });
  });

  it('names the key path and the variable when one is unset or malformed', () => {
    const file = configFile('cors:\n  origins:\n    - https://${LP_UNSET_DOMAIN}\n');
    assert.match(refusal(['--config', file]), /: cors\.origins\[0\]: environment variable LP_UNSET_DOMAIN is not set/);
    // An empty value is a value; only a default replaces it.
    assert.match(refusal(['--config', file], { LP_UNSET_DOMAIN: '' }), /cors\.origins\[0\]: expected an origin/);
    assert.match(refusal(['--config', configFile('host: ${1BAD}\n')]), /: host: bad reference \$\{1BAD\}/);
    assert.match(refusal(['--config', configFile('host: "${HOST"\n')]), /: host: unterminated \$\{HOST/);
  });
});

describe('precedence: flags, then PORT / HOST, then the file, then the defaults', () => {
  it('applies each source in order, key by key', () => {
    const file = configFile('port: 7000\nhost: 10.0.0.1\nbroker: mem://file\nworkers: 3\nlogLevel: warn\ntls: { cert: file-cert.pem, key: file-key.pem }\n');
    // The file over the defaults.
    assert.deepEqual(serve(['--config', file]), {
      port: 7000,
      host: '10.0.0.1',
      broker: 'mem://file',
      workers: 3,
      logLevel: 'warn',
      tls: { cert: join(dir, 'file-cert.pem'), key: join(dir, 'file-key.pem') }, // relative to the file
    });
    // The environment over the file.
    const env = { PORT: '7001', HOST: '127.0.0.2' };
    assert.deepEqual(serve(['--config', file], env), { ...serve(['--config', file]), port: 7001, host: '127.0.0.2' });
    // Flags over both; a flag may replace one half of tls.
    assert.deepEqual(serve(['--config', file, '--port', '7002', '--host', '::1', '--broker', 'mem://flag', '--workers', '4', '--log-level', 'debug', '--tls-key', 'flag-key.pem', '--http2', '--shutdown-timeout', '500'], env), {
      port: 7002,
      host: '::1',
      broker: 'mem://flag',
      workers: 4,
      logLevel: 'debug',
      tls: { cert: join(dir, 'file-cert.pem'), key: 'flag-key.pem' },
      http2: true,
      shutdownTimeoutMs: 500,
    });
    // Nothing set: the defaults, and no library options.
    assert.deepEqual(serve([]), { host: '127.0.0.1', port: 8080, broker: 'mem://' });
  });

  it('keeps the loopback policy (any origin, HTTP publish for mem://) only where the file sets no cors / publish', () => {
    assert.deepEqual(relayOptions(serve([])), { cors: { origins: '*' }, publish: true });
    const cors = serve(['--config', configFile('cors: { origins: [https://app.example.com] }\n')]);
    assert.deepEqual(relayOptions(cors), { cors: { origins: ['https://app.example.com'] }, publish: true });
    const closed = serve(['--config', configFile('cors: false\npublish: false\nheartbeatMs: 100\n')]);
    assert.deepEqual(relayOptions(closed), { cors: false, publish: false, heartbeatMs: 100 });
    // auth refuses CORS for any origin, so with auth the loopback default is same-origin only.
    const auth = serve(['--config', configFile('auth: { anonymous: { subscribe: ["*"] } }\nlimits: { maxSessions: 5 }\n')]);
    assert.deepEqual(relayOptions(auth), { cors: false, publish: true, auth: { anonymous: { subscribe: ['*'] } }, limits: { maxSessions: 5 } });
  });

  it('starts where PORT / HOST say even though the file names another address, and still applies the file', async () => {
    ensureBuilt();
    // 192.0.2.1 (TEST-NET-1) cannot be listened on here: HOST must replace it.
    const file = configFile('host: 192.0.2.1\nport: 1\nretryMs: 1234\n');
    const lp = new LivepipeProcess(['--config', file, '--port', '0'], { HOST: '127.0.0.1', PORT: '2' });
    try {
      const { base } = await lp.started();
      assert.match(base, /^http:\/\/127\.0\.0\.1:\d+$/);
      const reader = await SseReader.open(`${base}/events?topics=a`);
      try {
        await reader.until(() => reader.retry !== undefined, 5000, 'the retry line');
        assert.equal(reader.retry, 1234);
      } finally {
        reader.close();
      }
      assert.deepEqual(await lp.stop(), { code: 0, signal: null });
    } finally {
      await lp.kill();
    }
  });
});

describe('--print-config', () => {
  before(() => ensureBuilt());

  it('prints the effective configuration with every secret masked, and exits 0', async () => {
    const file = configFile(
      [
        'broker: nats://relay:${LP_BROKER_PASSWORD}@127.0.0.1:4222',
        'heartbeatMs: 5000',
        'publish: { token: publish-token-value }',
        'cors: { origins: [https://app.example.com] }',
        'auth:',
        '  jwt: { secret: "${LP_JWT_SECRET}", audience: livepipe }',
        '  callout:',
        '    url: https://svc:callout-password@app.example.com/authorize',
        '    headers: { x-api-key: callout-header-value }',
        'tracing: { endpoint: "https://otel:tracing-password@otel.example.com/v1/traces" }',
        '',
      ].join('\n'),
    );
    const result = await runLivepipe(['--config', file, '--print-config', '--workers', '2'], { LP_BROKER_PASSWORD: 'broker-password', LP_JWT_SECRET: SECRET });
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stderr, '');
    for (const secret of ['broker-password', SECRET, 'publish-token-value', 'callout-password', 'callout-header-value', 'tracing-password']) {
      assert.ok(!result.stdout.includes(secret), `${secret} printed:\n${result.stdout}`);
    }
    const printed = parse(result.stdout) as Record<string, any>;
    assert.equal(printed.broker, 'nats://relay:***@127.0.0.1:4222');
    assert.deepEqual(printed.publish, { token: '***' });
    assert.equal(printed.auth.jwt.secret, '***');
    assert.equal(printed.auth.jwt.audience, 'livepipe');
    assert.equal(printed.auth.callout.url, 'https://svc:***@app.example.com/authorize');
    assert.deepEqual(printed.auth.callout.headers, { 'x-api-key': '***' });
    assert.equal(printed.tracing.endpoint, 'https://otel:***@otel.example.com/v1/traces');
    // Effective: flags applied, defaults filled in.
    assert.equal(printed.workers, 2);
    assert.equal(printed.heartbeatMs, 5000);
    assert.equal(printed.sessionTtlMs, 60_000);
    assert.equal(printed.paths.events, '/events');
    assert.deepEqual(printed.cors, { origins: ['https://app.example.com'] });
    assert.equal(printed.port, 8080);
  });

  it('shows the loopback defaults, and its output is a config file that means the same', () => {
    const command = parseCli(['--print-config', '--port', '0'], {});
    assert.equal(command.kind, 'print-config');
    const printed = printConfig((command as { config: ServerConfig }).config);
    assert.deepEqual(parse(printed).cors, { origins: '*' });
    assert.equal(parse(printed).publish, true);
    const again = serve(['--config', configFile(printed)]);
    assert.equal(printConfig(again), printed);
  });
});

describe('a config file changes what the server does', () => {
  let lp: LivepipeProcess;
  let base: string;
  before(async () => {
    ensureBuilt();
    const file = configFile(
      [
        'port: 0',
        'paths: { events: /stream, publish: /send }',
        'heartbeatMs: 100',
        'retryMs: 750',
        'maxTopicsPerSession: 2',
        'publish: { token: "${LP_PUBLISH_TOKEN}" }',
        'cors: { origins: [http://allowed.test] }',
        '',
      ].join('\n'),
    );
    lp = new LivepipeProcess(['--config', file], { LP_PUBLISH_TOKEN: 'pub-token' });
    ({ base } = await lp.started());
  });
  after(() => lp.kill());

  it('serves the configured paths, heartbeat, retry and topic cap', async () => {
    assert.equal((await fetch(`${base}/events?topics=news`)).status, 404);
    const reader = await SseReader.open(`${base}/stream?topics=news`);
    try {
      await reader.until(() => reader.config !== undefined, 5000, 'the config event');
      assert.equal(reader.config.heartbeat_ms, 100);
      assert.equal(reader.retry, 750);
      await reader.until(() => reader.comments.length > 0, 5000, 'a keep-alive comment');
      const tooMany = await post(`${base}/update_subscriptions`, JSON.stringify({ session_id: reader.config.session_id, add: ['b', 'c'] }));
      assert.equal(tooMany.status, 429, JSON.stringify(tooMany.body));
      assert.equal(tooMany.body.error.code, 'too-many-topics');

      // The publish path and token come from the file (with the token from the environment).
      assert.equal((await post(`${base}/send?topic=news`, 'no token', {})).status, 403);
      assert.equal((await post(`${base}/send?topic=news`, 'hello', { authorization: 'Bearer pub-token' })).status, 204);
      await reader.until(() => reader.messages().length === 1, 5000, 'the published message');
      assert.deepEqual(reader.messages()[0]!.json, { topic: 'news', payload: 'hello' });
    } finally {
      reader.close();
    }
  });

  it('allows only the configured origins, instead of any origin on loopback', async () => {
    const allowed = await fetch(`${base}/healthz`, { headers: { origin: 'http://allowed.test' } });
    assert.equal(allowed.headers.get('access-control-allow-origin'), 'http://allowed.test');
    const other = await fetch(`${base}/healthz`, { headers: { origin: 'http://other.test' } });
    assert.equal(other.headers.get('access-control-allow-origin'), null);
  });
});

describe('a config file with auth', () => {
  it('starts on loopback (same-origin only, as auth refuses any origin) and lets a request without a token use only the anonymous topics', async () => {
    ensureBuilt();
    const lp = new LivepipeProcess(['--config', configFile('port: 0\nauth:\n  anonymous: { subscribe: [public/*] }\n')]);
    try {
      const { base } = await lp.started();
      const reader = await SseReader.open(`${base}/events?topics=public/a,private/b`);
      try {
        await reader.until(() => reader.config !== undefined && reader.errors().length > 0, 5000, 'the config event and a forbidden error');
        assert.deepEqual(reader.config.subscriptions, ['public/a']);
        assert.equal(reader.errors()[0].code, 'forbidden');
      } finally {
        reader.close();
      }
      const cross = await fetch(`${base}/healthz`, { headers: { origin: 'http://example.test' } });
      assert.equal(cross.headers.get('access-control-allow-origin'), null);
      assert.deepEqual(await lp.stop(), { code: 0, signal: null });
    } finally {
      await lp.kill();
    }
  });
});

describe('livepipe.example.yaml', () => {
  it('is a valid config file', () => {
    const config = serve(['--config', EXAMPLE], { LIVEPIPE_JWT_SECRET: SECRET });
    assert.equal(config.host, '0.0.0.0');
    assert.equal(config.workers, 2);
    assert.equal(config.relay?.auth?.jwt?.secret, SECRET);
    assert.deepEqual(config.relay?.limits?.updateRate, { perSecond: 5, burst: 20 });
  });

  it('documents every key', () => {
    const text = readFileSync(EXAMPLE, 'utf8');
    for (const path of configKeyPaths()) {
      const key = path.split('.').at(-1)!;
      assert.match(text, new RegExp(`(^|[\\s{,#])${key}:`, 'm'), `${path} is not in livepipe.example.yaml`);
    }
  });

  it('shows the real defaults where it sets a key to its default', () => {
    const example = serve(['--config', EXAMPLE], { LIVEPIPE_JWT_SECRET: SECRET });
    const defaults = parse(printConfig(serve([]))) as Record<string, unknown>;
    for (const key of ['paths', 'heartbeatMs', 'retryMs', 'sessionTtlMs', 'topicGraceMs', 'history', 'outbox', 'maxTopicsPerSession', 'maxBodyBytes', 'embedJsonPayloads', 'logLevel', 'shutdownTimeoutMs', 'port']) {
      const value = key in example ? (example as unknown as Record<string, unknown>)[key] : (example.relay as Record<string, unknown>)[key];
      assert.deepEqual(value, defaults[key], key);
    }
  });
});

describe('usage', () => {
  it('lists every flag', () => {
    const text = usage();
    for (const flag of ['--config', '--print-config', '--workers', '--tls-cert', '--tls-key', '--http2', '--log-level', '--shutdown-timeout', '--port', '--host', '--broker', '--grpc-port']) {
      assert.ok(text.includes(flag), flag);
    }
  });
});
