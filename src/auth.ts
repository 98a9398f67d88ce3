import { createHash, createPublicKey, type KeyObject } from 'node:crypto';
import type { JWTPayload, JWTVerifyGetKey } from 'jose';
import { RelayError } from './errors.ts';
import type { AuthOptions, CorsOptions } from './options.ts';

/**
 * Authorization of PROTOCOL.md section 6. A bearer is authenticated once when it opens a stream,
 * updates a session or publishes; nothing here runs per message.
 *
 * A topic is allowed when a grant names it: the token's claim, the anonymous grants (which every
 * request has, with or without a token), or else the callout, asked only about what the first
 * two do not grant, and only for a request that carries a token (it is forwarded).
 */

export type Action = 'subscribe' | 'publish';

/** Where a request's bearer token may be: the Authorization header, the `access_token` query parameter or cookie. */
export interface Credentials {
  authorization?: string | null | undefined;
  /** The `access_token` query parameter. */
  query?: string | null | undefined;
  /**
   * The Cookie header. Left out where a cookie must not count: a page on any site can make the
   * browser send it with a plain form POST, so /publish takes no cookie (cross-site request forgery).
   */
  cookie?: string | null | undefined;
}

/** Who a request is, and what its token grants. */
export interface Principal {
  /** The token's `sub`; `token:<sha-256 of the token>` for a token without one; '' for a request without a token. */
  readonly identity: string;
  /** The bearer token, forwarded to the callout; undefined for an anonymous request. */
  readonly token: string | undefined;
  readonly subscribe: Grants;
  readonly publish: Grants;
  /** When the token expires (ms since the epoch); a long-lived WebSocket's later subscribe frames are refused after it. */
  readonly expiresAt: number | undefined;
}

const DEFAULT_CLAIM = 'livepipe';
const DEFAULT_CALLOUT_TIMEOUT_MS = 3_000;
const DEFAULT_CALLOUT_CACHE_MS = 10_000;
/** Callout answers kept at most; past it, expired ones go first, then the oldest. */
const MAX_CACHED_ANSWERS = 100_000;

const HMAC = ['HS256', 'HS384', 'HS512'];
const ASYMMETRIC = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512', 'EdDSA', 'Ed25519'];

/** Topic grants: exact topics, and patterns where `*` stands for any run of characters (none included). */
export class Grants {
  private readonly exact = new Set<string>();
  private readonly patterns: string[] = [];

  constructor(...lists: Array<readonly string[] | undefined>) {
    for (const list of lists) {
      for (const p of list ?? []) {
        if (p.includes('*')) this.patterns.push(p);
        else this.exact.add(p);
      }
    }
  }

  allows(topic: string): boolean {
    return this.exact.has(topic) || this.patterns.some((p) => globMatch(p, topic));
  }
}

/**
 * `*` matches any run of characters. Linear backtracking to the last star, not a RegExp: patterns
 * come from tokens, and `a*a*a*…` as a RegExp backtracks exponentially.
 */
export function globMatch(pattern: string, text: string): boolean {
  let p = 0;
  let t = 0;
  let star = -1;
  let mark = 0;
  while (t < text.length) {
    if (p < pattern.length && pattern[p] === '*') {
      star = p++;
      mark = t;
    } else if (p < pattern.length && pattern[p] === text[t]) {
      p++;
      t++;
    } else if (star >= 0) {
      p = star + 1;
      t = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.length && pattern[p] === '*') p++;
  return p === pattern.length;
}

/** A request's credentials from its headers and URL; `cookie` false where a cookie must not count (see Credentials). */
export function credentialsFrom(header: (name: string) => string | null | undefined, query: URLSearchParams | undefined, cookie: boolean): Credentials {
  return { authorization: header('authorization'), query: query?.get('access_token'), cookie: cookie ? header('cookie') : undefined };
}

/** The bearer token of a request: the Authorization header first, then the query parameter, then the cookie. */
export function bearerToken(credentials: Credentials): string | undefined {
  const header = credentials.authorization?.trim();
  if (header) {
    const match = /^Bearer\s+(\S+)$/i.exec(header);
    // Another scheme (Basic from a proxy, say) is not ours to read.
    if (match) return match[1];
  }
  if (credentials.query) return credentials.query;
  if (credentials.cookie) {
    for (const part of credentials.cookie.split(';')) {
      const eq = part.indexOf('=');
      if (eq < 0 || part.slice(0, eq).trim() !== 'access_token') continue;
      const value = part.slice(eq + 1).trim().replace(/^"(.*)"$/, '$1');
      try {
        return decodeURIComponent(value) || undefined;
      } catch {
        return value || undefined;
      }
    }
  }
  return undefined;
}

function forbidden(message: string, topic?: string): RelayError {
  return new RelayError('forbidden', message, topic === undefined ? undefined : { topic });
}

type Verify = (token: string) => Promise<JWTPayload>;

interface Answer {
  allow: boolean;
  until: number;
}

export class Authorizer {
  private readonly options: AuthOptions;
  private readonly verify: Verify | undefined;
  private readonly claim: string;
  private readonly anonymous: { subscribe: Grants; publish: Grants } | undefined;
  private readonly answers = new Map<string, Answer>();

  private constructor(options: AuthOptions, verify: Verify | undefined) {
    this.options = options;
    this.verify = verify;
    this.claim = options.jwt?.claim ?? DEFAULT_CLAIM;
    const anon = options.anonymous;
    this.anonymous = anon === undefined ? undefined : { subscribe: new Grants(anon.subscribe), publish: new Grants(anon.publish) };
  }

  /** Checks the options (throwing an Error that names the bad one) and loads jose when JWTs are configured. */
  static async create(options: AuthOptions, cors: CorsOptions | false): Promise<Authorizer> {
    checkOptions(options, cors);
    return new Authorizer(options, options.jwt === undefined ? undefined : await jwtVerifier(options.jwt));
  }

  /** Who the request is. Throws `forbidden` for a bad token, or for no token when anonymous access is off. */
  async authenticate(credentials: Credentials): Promise<Principal> {
    const token = bearerToken(credentials);
    if (token === undefined) {
      if (this.anonymous === undefined) {
        throw forbidden('this relay needs a bearer token: send Authorization: Bearer <token>, or an access_token query parameter or cookie');
      }
      return { identity: '', token: undefined, subscribe: this.anonymous.subscribe, publish: this.anonymous.publish, expiresAt: undefined };
    }
    if (this.verify === undefined) {
      if (this.options.callout === undefined) throw forbidden('this relay accepts no bearer tokens (only anonymous access)');
      // Without JWT settings the token is opaque: the callout alone judges it.
      return this.principal(token, tokenIdentity(token), undefined, undefined);
    }
    let payload: JWTPayload;
    try {
      payload = await this.verify(token);
    } catch (err) {
      throw refusal(err);
    }
    const grants = payload[this.claim];
    let subscribe: string[] | undefined;
    let publish: string[] | undefined;
    if (grants !== undefined) {
      if (typeof grants !== 'object' || grants === null || Array.isArray(grants)) throw badClaim(this.claim);
      const lists = grants as { subscribe?: unknown; publish?: unknown };
      if (!isStringList(lists.subscribe) || !isStringList(lists.publish)) throw badClaim(this.claim);
      subscribe = lists.subscribe;
      publish = lists.publish;
    }
    const identity = typeof payload.sub === 'string' && payload.sub !== '' ? payload.sub : tokenIdentity(token);
    return this.principal(token, identity, { subscribe, publish }, typeof payload.exp === 'number' ? payload.exp * 1000 : undefined);
  }

  /** Refuses a principal whose token has expired since it was checked (a WebSocket outlives its token). */
  assertCurrent(principal: Principal): void {
    if (principal.expiresAt === undefined) return;
    const tolerance = (this.options.jwt?.clockToleranceSec ?? 0) * 1000;
    if (Date.now() >= principal.expiresAt + tolerance) throw forbidden('the bearer token has expired: reconnect with a new one');
  }

  /**
   * The topics `principal` may not subscribe to or publish on, each as a `forbidden` error naming
   * its topic; none when all are allowed. A callout failure denies what it was asked about.
   */
  async denied(principal: Principal, action: Action, topics: string[]): Promise<RelayError[]> {
    const grants = action === 'subscribe' ? principal.subscribe : principal.publish;
    const undecided = topics.filter((t) => !grants.allows(t));
    if (undecided.length === 0) return [];
    const verb = action === 'subscribe' ? 'subscribe to' : 'publish on';
    if (this.options.callout === undefined || principal.token === undefined) {
      return undecided.map((t) => forbidden(`not allowed to ${verb} ${JSON.stringify(t)}`, t));
    }
    let allowed: Set<string>;
    try {
      allowed = await this.ask(principal, action, undecided);
    } catch (err) {
      return undecided.map((t) => forbidden(`not allowed to ${verb} ${JSON.stringify(t)}: ${(err as Error).message}`, t));
    }
    return undecided.filter((t) => !allowed.has(t)).map((t) => forbidden(`not allowed to ${verb} ${JSON.stringify(t)}`, t));
  }

  private principal(token: string, identity: string, claims: { subscribe?: string[] | undefined; publish?: string[] | undefined } | undefined, expiresAt: number | undefined): Principal {
    return {
      identity,
      token,
      subscribe: new Grants(claims?.subscribe, this.options.anonymous?.subscribe),
      publish: new Grants(claims?.publish, this.options.anonymous?.publish),
      expiresAt,
    };
  }

  /** Asks the callout which of `topics` it allows, from the cache where it answered recently. */
  private async ask(principal: Principal, action: Action, topics: string[]): Promise<Set<string>> {
    const callout = this.options.callout!;
    const now = Date.now();
    const allowed = new Set<string>();
    const unknown: string[] = [];
    for (const topic of topics) {
      const answer = this.answers.get(cacheKey(principal.identity, action, topic));
      if (answer !== undefined && answer.until > now) {
        if (answer.allow) allowed.add(topic);
      } else {
        unknown.push(topic);
      }
    }
    if (unknown.length === 0) return allowed;

    const timeoutMs = callout.timeoutMs ?? DEFAULT_CALLOUT_TIMEOUT_MS;
    let response: Response;
    try {
      response = await fetch(callout.url, {
        method: 'POST',
        headers: { ...callout.headers, 'content-type': 'application/json', accept: 'application/json', authorization: `Bearer ${principal.token}` },
        body: JSON.stringify({ identity: principal.identity, action, topics: unknown }),
        signal: AbortSignal.timeout(timeoutMs),
        // The bearer goes to the configured URL and nowhere else.
        redirect: 'error',
      });
    } catch (err) {
      // The backend's address stays out of the message: it reaches clients.
      if ((err as Error).name === 'TimeoutError') throw new Error(`the authorization service did not answer within ${timeoutMs} ms`);
      throw new Error('the authorization service could not be reached');
    }
    let body: unknown;
    try {
      body = response.ok ? await response.json() : undefined;
    } catch {
      body = undefined;
    }
    if (!response.ok) throw new Error(`the authorization service answered ${response.status}`);
    const allow = (body as { allow?: unknown } | null)?.allow;
    if (!isStringList(allow) || allow === undefined) throw new Error('the authorization service did not answer {"allow":[topics]}');

    const granted = new Set(allow);
    const until = Date.now() + (callout.cacheMs ?? DEFAULT_CALLOUT_CACHE_MS);
    for (const topic of unknown) {
      const allowTopic = granted.has(topic);
      if (allowTopic) allowed.add(topic);
      this.remember(cacheKey(principal.identity, action, topic), { allow: allowTopic, until });
    }
    return allowed;
  }

  private remember(key: string, answer: Answer): void {
    if (answer.until <= Date.now()) return; // cacheMs 0: no caching
    this.answers.delete(key); // re-inserted last, so that the oldest come first
    this.answers.set(key, answer);
    if (this.answers.size <= MAX_CACHED_ANSWERS) return;
    const now = Date.now();
    for (const [k, a] of this.answers) if (a.until <= now) this.answers.delete(k);
    for (const k of this.answers.keys()) {
      if (this.answers.size <= MAX_CACHED_ANSWERS) break;
      this.answers.delete(k);
    }
  }
}

function cacheKey(identity: string, action: Action, topic: string): string {
  return JSON.stringify([identity, action, topic]);
}

function tokenIdentity(token: string): string {
  return `token:${createHash('sha256').update(token).digest('base64url')}`;
}

function isStringList(value: unknown): value is string[] | undefined {
  return value === undefined || (Array.isArray(value) && value.every((v) => typeof v === 'string'));
}

function badClaim(claim: string): RelayError {
  return forbidden(`the bearer token's ${JSON.stringify(claim)} claim must be an object like {"subscribe":["topic","prefix.*"],"publish":[]}`);
}

/** Why a token was refused, in words a client can act on. A JWKS that cannot be fetched is the relay's problem, not the client's. */
function refusal(err: unknown): RelayError {
  const e = err as { code?: string; claim?: string; message?: string };
  switch (e.code) {
    case 'ERR_JWT_EXPIRED':
      return forbidden('the bearer token has expired');
    case 'ERR_JWT_CLAIM_VALIDATION_FAILED':
      if (e.claim === 'nbf') return forbidden('the bearer token is not valid yet (nbf)');
      if (e.claim === 'aud') return forbidden('the bearer token is not meant for this relay (aud)');
      if (e.claim === 'iss') return forbidden('the bearer token comes from an issuer this relay does not trust (iss)');
      return forbidden(`the bearer token was refused: ${e.message}`);
    case 'ERR_JWS_SIGNATURE_VERIFICATION_FAILED':
      return forbidden('the bearer token\'s signature does not verify');
    case 'ERR_JOSE_ALG_NOT_ALLOWED':
    case 'ERR_JOSE_NOT_SUPPORTED':
      return forbidden('the bearer token is signed with an algorithm this relay does not accept');
    case 'ERR_JWS_INVALID':
    case 'ERR_JWT_INVALID':
      return forbidden('the bearer token is not a valid JWT');
    case 'ERR_JWKS_NO_MATCHING_KEY':
    case 'ERR_JWKS_MULTIPLE_MATCHING_KEYS':
      return forbidden('no key of the relay\'s JWKS matches the bearer token (kid)');
    case 'ERR_JWKS_TIMEOUT':
    case 'ERR_JWKS_INVALID':
    case 'ERR_JOSE_GENERIC':
    case undefined:
      return new RelayError('internal', `bearer tokens cannot be checked now: the signing keys could not be loaded (${e.message ?? String(err)})`, { cause: err });
    default:
      return forbidden(`the bearer token was refused: ${e.message}`);
  }
}

/** Refuses option combinations that cannot work or are unsafe, at relay creation rather than on the first request. */
function checkOptions(options: AuthOptions, cors: CorsOptions | false): void {
  if (cors !== false && cors.origins === '*') {
    // Cookie tokens need credentialed CORS, which browsers refuse with '*'; and '*' would let any
    // site read streams opened with a visitor's cookie if it were allowed.
    throw new Error('livepipe: auth needs an explicit cors.origins list (not "*"): the access_token cookie makes requests credentialed, and credentials are never allowed for any origin');
  }
  const jwt = options.jwt;
  if (jwt !== undefined) {
    const keys = [jwt.secret, jwt.publicKey, jwt.jwksUrl].filter((k) => k !== undefined);
    if (keys.length !== 1) throw new Error('livepipe: auth.jwt needs exactly one of secret, publicKey or jwksUrl');
    // RFC 7518 section 3.2: an HMAC key at least as long as the hash (256 bits for HS256).
    if (jwt.secret !== undefined && Buffer.byteLength(jwt.secret) < 32) throw new Error('livepipe: auth.jwt.secret must be at least 32 bytes long (RFC 7518 section 3.2)');
    if (jwt.jwksUrl !== undefined && !URL.canParse(jwt.jwksUrl)) throw new Error(`livepipe: auth.jwt.jwksUrl is not a URL: ${JSON.stringify(jwt.jwksUrl)}`);
    const fits = jwt.secret !== undefined ? HMAC : ASYMMETRIC;
    for (const alg of jwt.algorithms ?? []) {
      if (!fits.includes(alg)) {
        throw new Error(`livepipe: auth.jwt.algorithms: ${JSON.stringify(alg)} does not fit a ${jwt.secret !== undefined ? 'shared secret' : 'public key'} (use ${fits.join(', ')})`);
      }
    }
  }
  if (options.callout !== undefined && !URL.canParse(options.callout.url)) throw new Error(`livepipe: auth.callout.url is not a URL: ${JSON.stringify(options.callout.url)}`);
}

/** The algorithms a PEM public key can verify, so that nothing else is ever accepted with it. */
function algorithmsFor(key: KeyObject): string[] {
  switch (key.asymmetricKeyType) {
    case 'rsa':
      return ['RS256', 'RS384', 'RS512'];
    case 'rsa-pss':
      return ['PS256', 'PS384', 'PS512'];
    case 'ec': {
      const curve = key.asymmetricKeyDetails?.namedCurve;
      const alg = curve === 'prime256v1' ? 'ES256' : curve === 'secp384r1' ? 'ES384' : curve === 'secp521r1' ? 'ES512' : undefined;
      if (alg === undefined) throw new Error(`livepipe: auth.jwt.publicKey: EC curve ${curve} is not one JWS uses (P-256, P-384, P-521)`);
      return [alg];
    }
    case 'ed25519':
      return ['EdDSA', 'Ed25519'];
    default:
      throw new Error(`livepipe: auth.jwt.publicKey: ${key.asymmetricKeyType} keys cannot verify JWTs`);
  }
}

/** Loads jose (only relays with JWT settings do) and returns a verifier for the configured key. */
async function jwtVerifier(jwt: NonNullable<AuthOptions['jwt']>): Promise<Verify> {
  const jose = await import('jose');
  let key: KeyObject | Uint8Array | JWTVerifyGetKey;
  let algorithms: string[];
  if (jwt.secret !== undefined) {
    key = new TextEncoder().encode(jwt.secret);
    algorithms = HMAC;
  } else if (jwt.publicKey !== undefined) {
    let publicKey: KeyObject;
    try {
      publicKey = createPublicKey(jwt.publicKey);
    } catch (err) {
      throw new Error(`livepipe: auth.jwt.publicKey is not a PEM public key: ${(err as Error).message}`, { cause: err });
    }
    key = publicKey;
    algorithms = algorithmsFor(publicKey);
  } else {
    // Fetched on first use and cached; a token with an unknown kid refetches (at most every 30 s).
    key = jose.createRemoteJWKSet(new URL(jwt.jwksUrl!));
    algorithms = ASYMMETRIC;
  }
  const options = {
    algorithms: jwt.algorithms ?? algorithms,
    issuer: jwt.issuer,
    audience: jwt.audience,
    clockTolerance: jwt.clockToleranceSec ?? 0,
  };
  return async (token) => (await jose.jwtVerify(token, key, options)).payload;
}
