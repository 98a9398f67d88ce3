/**
 * PROTOCOL.md section 6: bearer JWTs (HS256, RS256, ES256, JWKS), topic grants, sessions bound to
 * the identity that opened them, the auth callout and anonymous access — over real HTTP, WebSocket
 * and one Connect RPC.
 */
import { describe, it, before, after, mock } from 'node:test';
import assert from 'node:assert/strict';
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { SignJWT, UnsecuredJWT, exportJWK, base64url } from 'jose';
import { WebSocket } from 'ws';
import { createRelay, type Relay, type RelayOptions } from '../src/index.ts';
import { SseReader, post } from './support/relay.ts';

const SECRET = 'a-shared-secret-of-at-least-32-bytes!';
const ISSUER = 'https://issuer.test';
const AUDIENCE = 'livepipe-test';

interface Grants {
  subscribe?: string[];
  publish?: string[];
}

interface TokenOptions {
  sub?: string | null;
  grants?: Grants | null;
  /** Seconds from now; negative for an expired token. */
  exp?: number;
  nbf?: number;
  issuer?: string;
  audience?: string;
  key?: KeyObject | Uint8Array;
  alg?: string;
  kid?: string;
}

async function token(options: TokenOptions = {}): Promise<string> {
  const claims: Record<string, unknown> = {};
  if (options.grants !== null) claims.livepipe = options.grants ?? { subscribe: ['*'] };
  const now = Math.floor(Date.now() / 1000);
  const jwt = new SignJWT(claims)
    .setProtectedHeader({ alg: options.alg ?? 'HS256', ...(options.kid ? { kid: options.kid } : {}) })
    .setIssuedAt()
    .setIssuer(options.issuer ?? ISSUER)
    .setAudience(options.audience ?? AUDIENCE)
    .setExpirationTime(now + (options.exp ?? 300));
  if (options.sub !== null) jwt.setSubject(options.sub ?? 'alice');
  if (options.nbf !== undefined) jwt.setNotBefore(now + options.nbf);
  return jwt.sign(options.key ?? new TextEncoder().encode(SECRET));
}

const bearer = (t: string) => ({ authorization: `Bearer ${t}` });

interface AuthRelay {
  relay: Relay;
  base: string;
  ws: string;
  close(): Promise<void>;
}

/** A relay on node:http with every transport: the endpoints, WebSocket upgrades and the RPC service. */
async function startAuthRelay(options: Partial<RelayOptions>): Promise<AuthRelay> {
  const relay = await createRelay({ broker: `mem://auth-${process.pid}-${Math.random()}`, heartbeatMs: 200, ...options });
  const rpc = relay.connectHandler();
  const server = createServer((req, res) => void rpc(req, res, () => relay.handler(req, res)));
  server.on('upgrade', (req, socket, head) => {
    if (!relay.handleUpgrade(req, socket, head)) socket.destroy();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return {
    relay,
    base,
    ws: `${base.replace('http:', 'ws:')}/ws`,
    async close() {
      await relay.close();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** Opens a stream that must be refused; returns the status and the error. */
async function refused(url: string, headers: Record<string, string> = {}): Promise<{ status: number; error: { code: string; message: string; topic?: string } }> {
  const res = await fetch(url, { headers });
  if (res.headers.get('content-type')?.startsWith('text/event-stream')) {
    // Accepted after all: the stream never ends, so it is not read.
    await res.body?.cancel();
    return { status: res.status, error: { code: '', message: 'the stream was accepted' } };
  }
  const body = (await res.json()) as { error: { code: string; message: string } };
  return { status: res.status, error: body.error };
}

/** Opens a stream that must be accepted, and waits for its config event. */
async function stream(url: string, headers: Record<string, string> = {}): Promise<SseReader> {
  const s = await SseReader.open(url, headers);
  if (s.response.statusCode !== 200) {
    await s.until(() => s.ended, 5000, 'the refusal body');
    throw new Error(`stream refused with ${s.response.statusCode}: ${s.raw}`);
  }
  await s.until(() => s.events.length >= 1, 5000, 'the config event');
  return s;
}

/** Polls until `predicate` holds; on performance.now(), since some tests move Date. */
async function eventually(predicate: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = performance.now() + ms;
  while (!predicate()) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

const JWT_OPTIONS = { secret: SECRET, issuer: ISSUER, audience: AUDIENCE, clockToleranceSec: 30 };

describe('auth: bearer JWTs (HS256)', () => {
  let r: AuthRelay;
  before(async () => {
    r = await startAuthRelay({ auth: { jwt: JWT_OPTIONS }, cors: { origins: ['https://app.example'] } });
  });
  after(() => r.close());

  it('subscribes to the allowed topics and sends a forbidden error event for each denied one; the rest proceed', async () => {
    const t = await token({ grants: { subscribe: ['news.*', 'chat'] } });
    const s = await stream(`${r.base}/events?topics=news.sport,chat,secret,newsroom,news`, bearer(t));
    assert.deepEqual(s.config.subscriptions, ['news.sport', 'chat']);
    await s.until(() => s.errors().length >= 3, 5000, 'three forbidden events');
    assert.deepEqual(
      s.errors().map((e) => [e.code, e.topic]),
      [['forbidden', 'secret'], ['forbidden', 'newsroom'], ['forbidden', 'news']],
    );
    await r.relay.publish('secret', 'not for alice');
    await r.relay.publish('news.sport', 'goal');
    await s.until(() => s.messages().length >= 1, 5000, 'the allowed message');
    assert.deepEqual(s.messages().map((e) => e.json), [{ topic: 'news.sport', payload: 'goal' }]);
    s.close();
  });

  it('takes the token from the Authorization header, the access_token query parameter or the access_token cookie', async () => {
    const t = await token({ grants: { subscribe: ['q'] } });
    for (const [url, headers] of [
      [`${r.base}/events?topics=q`, bearer(t)],
      [`${r.base}/events?topics=q&access_token=${t}`, {}],
      [`${r.base}/events?topics=q`, { cookie: `theme=dark; access_token=${t}; other=1` }],
    ] as const) {
      const s = await stream(url, headers);
      assert.deepEqual(s.config.subscriptions, ['q'], JSON.stringify(headers));
      s.close();
    }
  });

  it('refuses a stream without a token with 403 forbidden, creating no session', async () => {
    const sessions = r.relay.stats().sessions;
    const res = await refused(`${r.base}/events?topics=a`);
    assert.equal(res.status, 403);
    assert.equal(res.error.code, 'forbidden');
    assert.match(res.error.message, /needs a bearer token/);
    assert.equal(r.relay.stats().sessions, sessions);
  });

  it('refuses expired, not-yet-valid, forged, wrong-audience, wrong-issuer, unsigned and malformed tokens', async () => {
    const valid = await token();
    const [header, , signature] = valid.split('.');
    const forgedPayload = base64url.encode(JSON.stringify({ sub: 'mallory', iss: ISSUER, aud: AUDIENCE, exp: Math.floor(Date.now() / 1000) + 300, livepipe: { subscribe: ['*'] } }));
    const cases: Array<[string, string, RegExp]> = [
      ['expired beyond the clock tolerance', await token({ exp: -120 }), /expired/],
      ['not valid for another hour', await token({ nbf: 3600 }), /not valid yet/],
      ['signed with another secret', await token({ key: new TextEncoder().encode('another-secret-that-is-32-bytes-long') }), /signature/],
      ['a payload swapped under a valid signature', `${header}.${forgedPayload}.${signature}`, /signature/],
      ['for another audience', await token({ audience: 'someone-else' }), /aud/],
      ['from another issuer', await token({ issuer: 'https://evil.test' }), /iss/],
      ['alg none', new UnsecuredJWT({ sub: 'mallory', livepipe: { subscribe: ['*'] } }).setIssuer(ISSUER).setAudience(AUDIENCE).setExpirationTime('5m').encode(), /algorithm/],
      ['not a JWT', 'not-a-jwt', /not a valid JWT/],
    ];
    for (const [what, t, message] of cases) {
      const res = await refused(`${r.base}/events?topics=a`, bearer(t));
      assert.equal(res.status, 403, what);
      assert.equal(res.error.code, 'forbidden', what);
      assert.match(res.error.message, message, what);
    }
  });

  it('accepts a token that expired within the clock tolerance', async () => {
    const s = await stream(`${r.base}/events?topics=a`, bearer(await token({ exp: -5 })));
    assert.deepEqual(s.config.subscriptions, ['a']);
    s.close();
  });

  it('refuses a token whose livepipe claim is malformed, and grants nothing to a token without one', async () => {
    const bad = await new SignJWT({ livepipe: { subscribe: 'a' } }).setProtectedHeader({ alg: 'HS256' }).setSubject('alice').setIssuer(ISSUER).setAudience(AUDIENCE).sign(new TextEncoder().encode(SECRET));
    const res = await refused(`${r.base}/events?topics=a`, bearer(bad));
    assert.equal(res.status, 403);
    assert.match(res.error.message, /"livepipe" claim must be an object/);

    const s = await stream(`${r.base}/events?topics=a`, bearer(await token({ grants: null })));
    assert.deepEqual(s.config.subscriptions, []);
    await s.until(() => s.errors().length >= 1, 5000, 'the forbidden event');
    assert.equal(s.errors()[0].code, 'forbidden');
    s.close();
  });

  it('update_subscriptions: adds allowed topics; a request with a denied topic is refused 403 and changes nothing', async () => {
    const t = await token({ grants: { subscribe: ['a', 'b', 'c'] } });
    const s = await stream(`${r.base}/events?topics=a`, bearer(t));
    const sid = s.config.session_id;
    const ok = await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sid, add: ['b'] }), { 'content-type': 'application/json', ...bearer(t) });
    assert.equal(ok.status, 200);
    assert.deepEqual(ok.body.subscriptions, ['a', 'b']);

    const denied = await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sid, add: ['c', 'd'], remove: ['a'] }), { 'content-type': 'application/json', ...bearer(t) });
    assert.equal(denied.status, 403);
    assert.equal(denied.body.error.code, 'forbidden');
    assert.equal(denied.body.error.topic, 'd');
    const same = await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sid }), { 'content-type': 'application/json', ...bearer(t) });
    assert.deepEqual(same.body.subscriptions, ['a', 'b'], 'neither the allowed add nor the remove applied');

    const anonymous = await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sid, add: ['c'] }));
    assert.equal(anonymous.status, 403, 'an update without a token is refused');
    s.close();
  });

  it('update_subscriptions from another identity is refused 403 and changes nothing', async () => {
    const alice = await token({ sub: 'alice' });
    const bob = await token({ sub: 'bob' });
    const s = await stream(`${r.base}/events?topics=a`, bearer(alice));
    const sid = s.config.session_id;
    const res = await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sid, add: ['x'], remove: ['a'] }), { 'content-type': 'application/json', ...bearer(bob) });
    assert.equal(res.status, 403);
    assert.equal(res.body.error.code, 'forbidden');
    assert.match(res.body.error.message, /another identity/);
    const same = await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sid }), { 'content-type': 'application/json', ...bearer(alice) });
    assert.deepEqual(same.body.subscriptions, ['a']);
    s.close();
  });

  it('a token without sub is its own identity: only the same token updates its session', async () => {
    const first = await token({ sub: null });
    const second = await token({ sub: null, exp: 600 });
    const s = await stream(`${r.base}/events?topics=a`, bearer(first));
    const sid = s.config.session_id;
    const same = await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sid, add: ['b'] }), { 'content-type': 'application/json', ...bearer(first) });
    assert.equal(same.status, 200);
    const other = await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sid, add: ['c'] }), { 'content-type': 'application/json', ...bearer(second) });
    assert.equal(other.status, 403);
    s.close();
  });

  it('a resume (Last-Event-ID or session_id) by another identity is refused 403 and leaves the session and its stream alone', async () => {
    const alice = await token({ sub: 'alice' });
    const bob = await token({ sub: 'bob' });
    const s = await stream(`${r.base}/events?topics=resume-a`, bearer(alice));
    const sid = s.config.session_id;
    const sessions = r.relay.stats().sessions;

    const byEventId = await refused(`${r.base}/events`, { ...bearer(bob), 'last-event-id': s.events[0]!.id! });
    assert.equal(byEventId.status, 403);
    assert.match(byEventId.error.message, /another identity/);
    const bySessionId = await refused(`${r.base}/events?session_id=${sid}`, bearer(bob));
    assert.equal(bySessionId.status, 403);
    assert.equal(r.relay.stats().sessions, sessions, 'no session was created');

    await r.relay.publish('resume-a', 'still here');
    await s.until(() => s.messages().length >= 1, 5000, 'the message on the untouched stream');
    assert.equal(s.ended, false);
    s.close();
  });

  it('a resume by the same identity with a new token keeps the session; topics the new token no longer grants are dropped with forbidden', async () => {
    const first = await token({ sub: 'carol', grants: { subscribe: ['ra', 'rb'] } });
    const s = await stream(`${r.base}/events?topics=ra,rb`, bearer(first));
    const sid = s.config.session_id;
    s.close();
    const narrower = await token({ sub: 'carol', grants: { subscribe: ['ra'] } });
    const again = await stream(`${r.base}/events?session_id=${sid}`, bearer(narrower));
    assert.equal(again.config.session_id, sid);
    assert.equal(again.config.resumed, true);
    assert.deepEqual(again.config.subscriptions, ['ra']);
    await again.until(() => again.errors().length >= 1, 5000, 'the forbidden event');
    assert.deepEqual(again.errors().map((e) => [e.code, e.topic]), [['forbidden', 'rb']]);
    again.close();
  });

  it('POST /publish needs a publish grant for the topic; a cookie does not count there', async () => {
    const t = await token({ grants: { subscribe: ['alerts.*'], publish: ['alerts.*'] } });
    const s = await stream(`${r.base}/events?topics=alerts.fire`, bearer(t));
    assert.equal((await post(`${r.base}/publish?topic=alerts.fire`, 'smoke', bearer(t))).status, 204);
    await s.until(() => s.messages().length >= 1, 5000, 'the published message');
    assert.deepEqual(s.messages()[0]!.json, { topic: 'alerts.fire', payload: 'smoke' });

    const other = await post(`${r.base}/publish?topic=news`, 'x', bearer(t));
    assert.equal(other.status, 403);
    assert.equal(other.body.error.code, 'forbidden');
    assert.equal((await post(`${r.base}/publish?topic=alerts.fire&access_token=${t}`, 'by query', {})).status, 204);
    assert.equal((await post(`${r.base}/publish?topic=alerts.fire`, 'x', {})).status, 403, 'no token');
    const byCookie = await post(`${r.base}/publish?topic=alerts.fire`, 'x', { cookie: `access_token=${t}` });
    assert.equal(byCookie.status, 403, 'any site could make a browser send the cookie with a form POST');
    const subscribeOnly = await token({ grants: { subscribe: ['*'] } });
    assert.equal((await post(`${r.base}/publish?topic=alerts.fire`, 'x', bearer(subscribeOnly))).status, 403);
    s.close();
  });

  it('lets listed origins send credentials (the cookie), in answers and preflights', async () => {
    const t = await token();
    const s = await stream(`${r.base}/events?topics=a`, { origin: 'https://app.example', cookie: `access_token=${t}` });
    assert.equal(s.response.headers['access-control-allow-origin'], 'https://app.example');
    assert.equal(s.response.headers['access-control-allow-credentials'], 'true');
    s.close();
    const preflight = await fetch(`${r.base}/update_subscriptions`, { method: 'OPTIONS', headers: { origin: 'https://app.example', 'access-control-request-method': 'POST' } });
    assert.equal(preflight.headers.get('access-control-allow-credentials'), 'true');
    const other = await fetch(`${r.base}/update_subscriptions`, { method: 'OPTIONS', headers: { origin: 'https://evil.example', 'access-control-request-method': 'POST' } });
    assert.equal(other.headers.get('access-control-allow-origin'), null);
    assert.equal(other.headers.get('access-control-allow-credentials'), null);
  });
});

describe('auth: the publish option with auth', () => {
  it('a publish token publishes on any topic; other bearers need a grant; publish: false disables the endpoint', async () => {
    const r = await startAuthRelay({ auth: { jwt: JWT_OPTIONS }, publish: { token: 'static-publisher-token' } });
    try {
      assert.equal((await post(`${r.base}/publish?topic=anything`, 'x', bearer('static-publisher-token'))).status, 204);
      assert.equal((await post(`${r.base}/publish?topic=p`, 'x', bearer(await token({ grants: { publish: ['p'] } })))).status, 204);
      assert.equal((await post(`${r.base}/publish?topic=q`, 'x', bearer(await token({ grants: { publish: ['p'] } })))).status, 403);
      assert.equal((await post(`${r.base}/publish?topic=p`, 'x', bearer('wrong-token'))).status, 403);
    } finally {
      await r.close();
    }
    const off = await startAuthRelay({ auth: { jwt: JWT_OPTIONS }, publish: false });
    try {
      assert.equal((await post(`${off.base}/publish?topic=p`, 'x', bearer(await token({ grants: { publish: ['p'] } })))).status, 404);
    } finally {
      await off.close();
    }
  });
});

describe('auth: anonymous access', () => {
  let r: AuthRelay;
  before(async () => {
    r = await startAuthRelay({ auth: { jwt: JWT_OPTIONS, anonymous: { subscribe: ['public.*'], publish: ['public.chat'] } } });
  });
  after(() => r.close());

  it('gives a request without a token the anonymous grants only', async () => {
    const s = await stream(`${r.base}/events?topics=public.news,private`);
    assert.deepEqual(s.config.subscriptions, ['public.news']);
    await s.until(() => s.errors().length >= 1, 5000, 'the forbidden event');
    assert.deepEqual(s.errors().map((e) => [e.code, e.topic]), [['forbidden', 'private']]);
    const sid = s.config.session_id;
    assert.equal((await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sid, add: ['public.more'] }))).status, 200);
    assert.equal((await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sid, add: ['private'] }))).status, 403);
    assert.equal((await post(`${r.base}/publish?topic=public.chat`, 'hi', {})).status, 204);
    assert.equal((await post(`${r.base}/publish?topic=public.news`, 'hi', {})).status, 403);
    // A bearer is another identity than the anonymous opener.
    const t = await token();
    assert.equal((await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: sid, add: ['public.x'] }), { 'content-type': 'application/json', ...bearer(t) })).status, 403);
    s.close();
  });

  it('gives a bearer its own grants and the anonymous ones; a bad token is refused, not treated as anonymous', async () => {
    const s = await stream(`${r.base}/events?topics=mine,public.news`, bearer(await token({ grants: { subscribe: ['mine'] } })));
    assert.deepEqual(s.config.subscriptions, ['mine', 'public.news']);
    s.close();
    const res = await refused(`${r.base}/events?topics=public.news`, bearer(await token({ exp: -3600 })));
    assert.equal(res.status, 403);
  });
});

describe('auth: RS256 and ES256 public keys', () => {
  for (const [alg, pair] of [
    ['RS256', generateKeyPairSync('rsa', { modulusLength: 2048 })],
    ['ES256', generateKeyPairSync('ec', { namedCurve: 'P-256' })],
  ] as const) {
    it(`verifies ${alg} tokens with a PEM public key, and refuses other keys and an HS256 token keyed with the public key`, async () => {
      const pem = pair.publicKey.export({ type: 'spki', format: 'pem' }).toString();
      const r = await startAuthRelay({ auth: { jwt: { publicKey: pem, issuer: ISSUER, audience: AUDIENCE } } });
      try {
        const s = await stream(`${r.base}/events?topics=a`, bearer(await token({ alg, key: pair.privateKey })));
        assert.deepEqual(s.config.subscriptions, ['a']);
        s.close();
        const stranger = alg === 'RS256' ? generateKeyPairSync('rsa', { modulusLength: 2048 }) : generateKeyPairSync('ec', { namedCurve: 'P-256' });
        const forged = await refused(`${r.base}/events?topics=a`, bearer(await token({ alg, key: stranger.privateKey })));
        assert.equal(forged.status, 403);
        assert.match(forged.error.message, /signature/);
        // The algorithm-confusion attack: the public key (which anyone has) used as an HMAC secret.
        const confused = await refused(`${r.base}/events?topics=a`, bearer(await token({ alg: 'HS256', key: new TextEncoder().encode(pem) })));
        assert.equal(confused.status, 403);
        assert.match(confused.error.message, /algorithm/);
      } finally {
        await r.close();
      }
    });
  }
});

/** A JWKS endpoint on a local server, whose keys a test can rotate; counts its requests. */
async function startJwks(): Promise<{ url: string; keys: object[]; requests: number; close(): Promise<void> }> {
  const state = { keys: [] as object[], requests: 0 };
  const server = createServer((_req, res) => {
    state.requests++;
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ keys: state.keys }));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return Object.assign(state, {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/.well-known/jwks.json`,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  });
}

describe('auth: a JWKS URL', () => {
  it('fetches the keys, and fetches again for a new kid once the cooldown has passed (key rotation)', async () => {
    const jwks = await startJwks();
    const first = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const second = generateKeyPairSync('rsa', { modulusLength: 2048 });
    jwks.keys = [{ ...(await exportJWK(first.publicKey)), kid: 'k1', alg: 'ES256', use: 'sig' }];
    const r = await startAuthRelay({ auth: { jwt: { jwksUrl: jwks.url, issuer: ISSUER, audience: AUDIENCE } } });
    // jose refetches for an unknown kid at most every 30 s: the test moves the clock, not a sleep.
    mock.timers.enable({ apis: ['Date'], now: Date.now() });
    try {
      const s = await stream(`${r.base}/events?topics=a`, bearer(await token({ alg: 'ES256', key: first.privateKey, kid: 'k1' })));
      s.close();
      assert.equal(jwks.requests, 1);

      jwks.keys = [...jwks.keys, { ...(await exportJWK(second.publicKey)), kid: 'k2', alg: 'RS256', use: 'sig' }];
      const rotated = await token({ alg: 'RS256', key: second.privateKey, kid: 'k2' });
      const early = await refused(`${r.base}/events?topics=a`, bearer(rotated));
      assert.equal(early.status, 403, 'a kid sprayed right after a fetch does not make the relay refetch');
      assert.match(early.error.message, /no key/);
      assert.equal(jwks.requests, 1);

      mock.timers.setTime(Date.now() + 31_000);
      const later = await stream(`${r.base}/events?topics=a`, bearer(await token({ alg: 'RS256', key: second.privateKey, kid: 'k2' })));
      assert.deepEqual(later.config.subscriptions, ['a']);
      later.close();
      assert.equal(jwks.requests, 2);
      const unknownKid = await refused(`${r.base}/events?topics=a`, bearer(await token({ alg: 'ES256', key: first.privateKey, kid: 'k3' })));
      assert.equal(unknownKid.status, 403);
    } finally {
      mock.timers.reset();
      await r.close();
      await jwks.close();
    }
  });

  it('answers 500 (the relay cannot check tokens, the client is not at fault) when the JWKS cannot be fetched', async () => {
    const jwks = await startJwks();
    const url = jwks.url;
    await jwks.close();
    const r = await startAuthRelay({ auth: { jwt: { jwksUrl: url } } });
    try {
      const key = generateKeyPairSync('ec', { namedCurve: 'P-256' });
      const res = await refused(`${r.base}/events?topics=a`, bearer(await token({ alg: 'ES256', key: key.privateKey, kid: 'k1' })));
      assert.equal(res.status, 500);
      assert.match(res.error.message, /signing keys could not be loaded/);
    } finally {
      await r.close();
    }
  });
});

interface CalloutRequest {
  body: { identity: string; action: string; topics: string[] };
  authorization: string | undefined;
  secret: string | undefined;
}

/** The app's authorization backend: records each request and answers with `answer`. */
async function startBackend(answer: (body: CalloutRequest['body'], res: ServerResponse) => void): Promise<{ url: string; requests: CalloutRequest[]; close(): Promise<void> }> {
  const requests: CalloutRequest[] = [];
  const server: Server = createServer(async (req: IncomingMessage, res) => {
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    const body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    requests.push({ body, authorization: req.headers.authorization, secret: req.headers['x-relay-secret'] as string | undefined });
    answer(body, res);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/authorize`,
    requests,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** Allows the topics that start with `extra`. */
function allowExtra(body: CalloutRequest['body'], res: ServerResponse): void {
  res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ allow: body.topics.filter((t) => t.startsWith('extra')) }));
}

describe('auth: the callout', () => {
  it('asks the backend about what the token does not grant, forwarding the bearer, and caches its answers per identity and topic', async () => {
    const backend = await startBackend(allowExtra);
    const r = await startAuthRelay({ auth: { jwt: JWT_OPTIONS, callout: { url: backend.url, cacheMs: 60_000, headers: { 'x-relay-secret': 's3cret' } } } });
    try {
      const t = await token({ sub: 'dora', grants: { subscribe: ['own'], publish: [] } });
      const s = await stream(`${r.base}/events?topics=own,extra.1,nope`, bearer(t));
      assert.deepEqual(s.config.subscriptions, ['own', 'extra.1']);
      await s.until(() => s.errors().length >= 1, 5000, 'the forbidden event');
      assert.deepEqual(s.errors().map((e) => [e.code, e.topic]), [['forbidden', 'nope']]);
      assert.deepEqual(backend.requests, [{ body: { identity: 'dora', action: 'subscribe', topics: ['extra.1', 'nope'] }, authorization: `Bearer ${t}`, secret: 's3cret' }]);

      // The same checks again, on another stream and an update: answered from the cache.
      const again = await stream(`${r.base}/events?topics=extra.1,nope`, bearer(t));
      assert.deepEqual(again.config.subscriptions, ['extra.1']);
      const denied = await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: again.config.session_id, add: ['nope'] }), { 'content-type': 'application/json', ...bearer(t) });
      assert.equal(denied.status, 403);
      assert.equal(denied.body.error.topic, 'nope');
      assert.equal(backend.requests.length, 1, 'the backend saw one request for repeated checks');

      // A new topic is asked about (alone); another identity is asked about the same topics again.
      const up = await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: again.config.session_id, add: ['extra.2'] }), { 'content-type': 'application/json', ...bearer(t) });
      assert.deepEqual(up.body.subscriptions, ['extra.1', 'extra.2']);
      assert.deepEqual(backend.requests[1]!.body.topics, ['extra.2']);
      const eve = await stream(`${r.base}/events?topics=extra.1`, bearer(await token({ sub: 'eve', grants: null })));
      assert.deepEqual(eve.config.subscriptions, ['extra.1']);
      assert.deepEqual(backend.requests[2]!.body, { identity: 'eve', action: 'subscribe', topics: ['extra.1'] });

      // Publishing is asked about as its own action.
      assert.equal((await post(`${r.base}/publish?topic=extra.1`, 'x', bearer(t))).status, 204);
      assert.equal((await post(`${r.base}/publish?topic=other`, 'x', bearer(t))).status, 403);
      assert.deepEqual(backend.requests.slice(3).map((q) => [q.body.action, q.body.topics]), [['publish', ['extra.1']], ['publish', ['other']]]);
      for (const x of [s, again, eve]) x.close();
    } finally {
      await r.close();
      await backend.close();
    }
  });

  it('denies, with a clear message, when the backend does not answer in time, is down, or answers an error', async () => {
    const hanging = await startBackend(() => {}); // never answers
    const failing = await startBackend((_body, res) => res.writeHead(500).end('oops'));
    const down = await startBackend(allowExtra);
    const downUrl = down.url;
    await down.close();
    const t = await token({ grants: { subscribe: ['own'] } });
    try {
      for (const [url, message] of [
        [hanging.url, /did not answer within 100 ms/],
        [downUrl, /could not be reached/],
        [failing.url, /answered 500/],
      ] as const) {
        const r = await startAuthRelay({ auth: { jwt: JWT_OPTIONS, callout: { url, timeoutMs: 100 } } });
        try {
          const s = await stream(`${r.base}/events?topics=own,extra.1`, bearer(t));
          assert.deepEqual(s.config.subscriptions, ['own'], 'topics granted by the token proceed');
          await s.until(() => s.errors().length >= 1, 5000, 'the forbidden event');
          assert.equal(s.errors()[0].code, 'forbidden');
          assert.equal(s.errors()[0].topic, 'extra.1');
          assert.match(s.errors()[0].message, message);
          const update = await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: s.config.session_id, add: ['extra.1'] }), { 'content-type': 'application/json', ...bearer(t) });
          assert.equal(update.status, 403);
          assert.match(update.body.error.message, message);
          s.close();
        } finally {
          await r.close();
        }
      }
    } finally {
      await hanging.close();
      await failing.close();
    }
  });

  it('without JWT settings, judges opaque tokens by the callout alone; the token hash is the identity', async () => {
    const backend = await startBackend((body, res) => res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ allow: body.topics.filter((t) => t !== 'secret') })));
    const r = await startAuthRelay({ auth: { callout: { url: backend.url } } });
    try {
      const s = await stream(`${r.base}/events?topics=a,secret`, bearer('opaque-session-token'));
      assert.deepEqual(s.config.subscriptions, ['a']);
      assert.match(backend.requests[0]!.body.identity, /^token:[A-Za-z0-9_-]{43}$/);
      assert.equal(backend.requests[0]!.authorization, 'Bearer opaque-session-token');
      const other = await post(`${r.base}/update_subscriptions`, JSON.stringify({ session_id: s.config.session_id, add: ['b'] }), { 'content-type': 'application/json', ...bearer('another-token') });
      assert.equal(other.status, 403);
      s.close();
    } finally {
      await r.close();
      await backend.close();
    }
  });
});

/** A `ws` client that keeps its frames. */
async function wsOpen(url: string, headers: Record<string, string> = {}): Promise<{ socket: WebSocket; frames: any[]; closed: () => number | undefined; until(p: () => boolean, what: string): Promise<void> }> {
  const socket = new WebSocket(url, { headers });
  const frames: any[] = [];
  let code: number | undefined;
  socket.on('message', (data) => frames.push(JSON.parse(data.toString())));
  socket.on('close', (c) => (code = c));
  socket.on('error', () => {});
  const until = (p: () => boolean, what: string) => eventually(p, `${what}; frames: ${JSON.stringify(frames)}`);
  await until(() => frames.length >= 1 || code !== undefined, 'the first frame');
  return { socket, frames, closed: () => code, until };
}

describe('auth: WebSocket and RPC', () => {
  let r: AuthRelay;
  before(async () => {
    r = await startAuthRelay({ auth: { jwt: JWT_OPTIONS } });
  });
  after(() => r.close());

  it('WebSocket: authenticates the upgrade (query token), denies topics with error frames, and checks subscribe frames against the grants', async () => {
    const t = await token({ grants: { subscribe: ['w.*'] } });
    const c = await wsOpen(`${r.ws}?topics=w.1,x&access_token=${t}`);
    assert.deepEqual(c.frames[0].payload.subscriptions, ['w.1']);
    await c.until(() => c.frames.some((f) => f.error?.code === 'forbidden'), 'the forbidden frame');
    c.socket.send(JSON.stringify({ type: 'subscribe', topics: ['w.2', 'y'], ref: 1 }));
    await c.until(() => c.frames.some((f) => f.ref === 1), 'the answer');
    assert.equal(c.frames.find((f) => f.ref === 1).error.code, 'forbidden');
    c.socket.send(JSON.stringify({ type: 'subscribe', topics: ['w.2'], ref: 2 }));
    await c.until(() => c.frames.some((f) => f.ref === 2), 'the answer');
    assert.deepEqual(c.frames.find((f) => f.ref === 2).subscriptions, ['w.1', 'w.2']);
    c.socket.close();

    const header = await wsOpen(`${r.ws}?topics=w.1`, bearer(t));
    assert.deepEqual(header.frames[0].payload.subscriptions, ['w.1']);
    header.socket.close();
  });

  it('WebSocket: refuses subscribe frames once the token that opened the stream has expired', async () => {
    const c = await wsOpen(`${r.ws}?topics=w.1&access_token=${await token({ exp: 60 })}`);
    mock.timers.enable({ apis: ['Date'], now: Date.now() });
    try {
      mock.timers.setTime(Date.now() + 120_000); // past exp and the 30 s tolerance
      c.socket.send(JSON.stringify({ type: 'subscribe', topics: ['w.2'], ref: 1 }));
      await c.until(() => c.frames.some((f) => f.ref === 1), 'the answer');
      const answer = c.frames.find((f) => f.ref === 1);
      assert.equal(answer.error.code, 'forbidden');
      assert.match(answer.error.message, /expired/);
    } finally {
      mock.timers.reset();
      c.socket.close();
    }
  });

  it('WebSocket: refuses a missing or bad token with an error frame and close code 1008', async () => {
    for (const url of [`${r.ws}?topics=w.1`, `${r.ws}?topics=w.1&access_token=${await token({ exp: -3600 })}`]) {
      const c = await wsOpen(url);
      await c.until(() => c.closed() !== undefined, 'the close');
      assert.equal(c.frames[0].error.code, 'forbidden');
      assert.equal(c.closed(), 1008);
    }
  });

  it('RPC: a Stream call authenticates once: denied topics get error events; without a token the call ends with PermissionDenied', async () => {
    // Connect-protocol server streaming over fetch: enveloped JSON (1 flag byte, 4 length bytes); flag 2 ends the stream.
    const call = async (headers: Record<string, string>, want: number) => {
      const message = Buffer.from(JSON.stringify({ topics: ['r.1', 'x'] }));
      const envelope = Buffer.concat([Buffer.from([0, 0, 0, 0, 0]), message]);
      envelope.writeUInt32BE(message.length, 1);
      const res = await fetch(`${r.base}/livepipe.v1.Relay/Stream`, { method: 'POST', headers: { 'content-type': 'application/connect+json', 'connect-protocol-version': '1', ...headers }, body: envelope });
      const reader = res.body!.getReader();
      let buffer = Buffer.alloc(0);
      const out: Array<{ flag: number; json: any }> = [];
      while (out.length < want) {
        while (buffer.length >= 5 && buffer.length >= 5 + buffer.readUInt32BE(1)) {
          const length = buffer.readUInt32BE(1);
          out.push({ flag: buffer[0]!, json: JSON.parse(buffer.subarray(5, 5 + length).toString()) });
          buffer = buffer.subarray(5 + length);
        }
        if (out.length >= want) break;
        const { value, done } = await reader.read();
        if (done) break;
        buffer = Buffer.concat([buffer, value]);
      }
      await reader.cancel();
      return out;
    };
    const [config, denied] = await call(bearer(await token({ grants: { subscribe: ['r.*'] } })), 2);
    assert.deepEqual(config!.json.config.subscriptions, ['r.1']);
    assert.equal(denied!.json.error.code, 'forbidden');
    assert.equal(denied!.json.error.topic, 'x');

    const [end] = await call({}, 1);
    assert.equal(end!.flag, 2, 'the end-of-stream envelope');
    assert.equal(end!.json.error.code, 'permission_denied');
    assert.match(end!.json.error.message, /^forbidden: this relay needs a bearer token/);
  });

  it('RPC: UpdateSubscriptions from another identity or for a denied topic is PermissionDenied', async () => {
    const alice = await token({ sub: 'alice', grants: { subscribe: ['r.*'] } });
    const s = await stream(`${r.base}/events?topics=r.1`, bearer(alice));
    const call = (t: string, add: string[]) =>
      fetch(`${r.base}/livepipe.v1.Relay/UpdateSubscriptions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'connect-protocol-version': '1', ...bearer(t) },
        body: JSON.stringify({ sessionId: s.config.session_id, add }),
      });
    const ok = await call(alice, ['r.2']);
    assert.equal(ok.status, 200);
    assert.deepEqual(((await ok.json()) as { subscriptions: string[] }).subscriptions, ['r.1', 'r.2']);
    for (const res of [await call(await token({ sub: 'bob' }), ['r.3']), await call(alice, ['q'])]) {
      assert.equal(res.status, 403);
      const body = (await res.json()) as { code: string; message: string };
      assert.equal(body.code, 'permission_denied');
      assert.match(body.message, /^forbidden: /);
    }
    s.close();
  });
});

describe('auth: the fetch handler', () => {
  it('authenticates streams, updates and publishes as the node handler does', async () => {
    const relay = await createRelay({ broker: `mem://auth-fetch-${Math.random()}`, auth: { jwt: JWT_OPTIONS } });
    try {
      const base = 'http://relay.example';
      const alice = await token({ sub: 'alice', grants: { subscribe: ['f.*'], publish: ['f.1'] } });
      assert.equal((await relay.fetch(new Request(`${base}/events?topics=f.1`))).status, 403);
      const opened = await relay.fetch(new Request(`${base}/events?topics=f.1`, { headers: { cookie: `access_token=${alice}` } }));
      assert.equal(opened.status, 200);
      const reader = opened.body!.getReader();
      const first = new TextDecoder().decode((await reader.read()).value);
      const sessionId = /"session_id":"([^"]+)"/.exec(first)![1];
      const update = (t: string, add: string[]) =>
        relay.fetch(new Request(`${base}/update_subscriptions`, { method: 'POST', headers: { 'content-type': 'application/json', ...bearer(t) }, body: JSON.stringify({ session_id: sessionId, add }) }));
      assert.equal((await update(alice, ['f.2'])).status, 200);
      assert.equal((await update(alice, ['g'])).status, 403);
      assert.equal((await update(await token({ sub: 'bob' }), ['f.3'])).status, 403);
      const publish = (topic: string, headers: Record<string, string>) => relay.fetch(new Request(`${base}/publish?topic=${topic}`, { method: 'POST', headers, body: 'x' }));
      assert.equal((await publish('f.1', bearer(alice))).status, 204);
      assert.equal((await publish('f.2', bearer(alice))).status, 403);
      assert.equal((await publish('f.1', { cookie: `access_token=${alice}` })).status, 403);
      await reader.cancel();
    } finally {
      await relay.close();
    }
  });
});

describe('auth: options checked at relay creation', () => {
  const cases: Array<[string, Partial<RelayOptions>, RegExp]> = [
    ['cors "*" with auth', { auth: { jwt: { secret: SECRET } }, cors: { origins: '*' } }, /explicit cors.origins/],
    ['a short HMAC secret', { auth: { jwt: { secret: 'short' } } }, /at least 32 bytes/],
    ['two keys', { auth: { jwt: { secret: SECRET, jwksUrl: 'https://idp.example/jwks' } } }, /exactly one of/],
    ['no key', { auth: { jwt: {} } }, /exactly one of/],
    ['an algorithm that does not fit the key', { auth: { jwt: { secret: SECRET, algorithms: ['RS256'] } } }, /does not fit/],
    ['alg none', { auth: { jwt: { publicKey: 'x', algorithms: ['none'] } } }, /does not fit/],
    ['a public key that is not PEM', { auth: { jwt: { publicKey: 'not a key' } } }, /not a PEM public key/],
    ['a callout URL that is not a URL', { auth: { callout: { url: 'nope' } } }, /callout.url/],
  ];
  for (const [what, options, message] of cases) {
    it(`refuses ${what}`, async () => {
      await assert.rejects(createRelay({ broker: `mem://auth-options-${Math.random()}`, ...options }), message);
    });
  }
});
