import { timingSafeEqual } from 'node:crypto';
import type { Credentials } from '../auth.ts';
import { RelayError } from '../errors.ts';
import { isLoopbackHost } from '../net.ts';
import type { CorsOptions, PublishSetting, RelayPaths } from '../options.ts';
import type { RelayCore, UpdateRequest } from '../relay.ts';
import { assertTopic, assertTopicArray, parseTopicList } from '../topics.ts';

/** Request handling shared by the node:http and fetch adapters. */

export type Endpoint = keyof RelayPaths;

export function endpointFor(pathname: string, paths: RelayPaths): Endpoint | undefined {
  for (const key of Object.keys(paths) as Endpoint[]) if (paths[key] === pathname) return key;
  return undefined;
}

/** Which methods each endpoint answers. */
export const METHODS: Record<Endpoint, string[]> = {
  events: ['GET'],
  update: ['POST'],
  publish: ['POST'],
  health: ['GET', 'HEAD'],
  ready: ['GET', 'HEAD'],
  metrics: ['GET'],
  ws: ['GET'],
};

export const SSE_HEADERS: Record<string, string> = {
  'content-type': 'text/event-stream; charset=utf-8',
  'cache-control': 'no-cache, no-transform',
  'x-accel-buffering': 'no',
};

export const JSON_TYPE = 'application/json; charset=utf-8';

/**
 * CORS response headers for a request from `origin`, or none when it is not allowed.
 * `credentials` (auth on) lets listed origins send cookies (EventSource `withCredentials`);
 * never with '*', which the relay refuses together with auth when it is created.
 */
export function corsHeaders(origin: string | undefined, cors: CorsOptions | false, preflight: boolean, credentials = false): Record<string, string> {
  if (cors === false) return {};
  if (origin === undefined) return cors.origins === '*' ? {} : { vary: 'Origin' };
  const headers: Record<string, string> = {};
  if (cors.origins === '*') {
    headers['access-control-allow-origin'] = '*';
  } else if (cors.origins.includes(origin)) {
    headers['access-control-allow-origin'] = origin;
    headers.vary = 'Origin';
    if (credentials) headers['access-control-allow-credentials'] = 'true';
  } else {
    // The answer depends on Origin: shared caches must not reuse it for an allowed origin.
    return { vary: 'Origin' };
  }
  if (preflight) {
    headers['access-control-allow-methods'] = 'GET, POST, OPTIONS';
    headers['access-control-allow-headers'] = 'Content-Type, Last-Event-ID, Authorization';
    headers['access-control-max-age'] = '600';
  }
  return headers;
}

function mediaType(contentType: string | undefined | null): string {
  return (contentType ?? '').split(';')[0]!.trim().toLowerCase();
}

/**
 * Parses an update_subscriptions body: gochan's JSON shape, or the form shape of Twitter's live
 * pipeline. JSON sent as text/plain (what `fetch` sends for a string body) is JSON too.
 */
export function parseUpdateBody(contentType: string | undefined | null, body: Buffer | unknown): UpdateRequest {
  const type = mediaType(contentType);
  if (type === 'application/x-www-form-urlencoded') {
    const text = Buffer.isBuffer(body) ? body.toString('utf8') : String(body ?? '');
    if (text.trimStart().startsWith('{')) {
      throw new RelayError('bad-request', 'the body looks like JSON but was sent as a form: send it with Content-Type: application/json');
    }
    const form = new URLSearchParams(text);
    return {
      sessionId: requireSessionId(form.get('session_id')),
      add: parseTopicList(form.get('sub_topics')),
      remove: parseTopicList(form.get('unsub_topics')),
    };
  }
  if (type !== '' && type !== 'application/json' && type !== 'text/plain' && !type.endsWith('+json')) {
    throw new RelayError('unsupported-media-type', `unsupported content type ${JSON.stringify(type)}: send application/json or application/x-www-form-urlencoded`);
  }
  let value: unknown = body;
  if (Buffer.isBuffer(body)) {
    try {
      value = JSON.parse(body.toString('utf8'));
    } catch (err) {
      throw new RelayError('bad-request', `malformed JSON: ${(err as Error).message}`);
    }
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new RelayError('bad-request', 'the body must be a JSON object like {"session_id":"…","add":["topic"],"remove":[]}');
  }
  const fields = value as Record<string, unknown>;
  return {
    sessionId: requireSessionId(fields.session_id),
    add: assertTopicArray(fields.add, 'add'),
    remove: assertTopicArray(fields.remove, 'remove'),
  };
}

function requireSessionId(value: unknown): string {
  if (value === undefined || value === null || value === '') throw new RelayError('bad-request', 'session_id is missing');
  if (typeof value !== 'string') throw new RelayError('bad-request', 'session_id must be a string');
  return value;
}

/**
 * Checks that publishing over HTTP is allowed for this request: `localAddress` is the address
 * the request arrived on, when the adapter knows it. Returns true when the request carries the
 * publish option's token. With `auth` on, a request without that token is not refused here: its
 * bearer's publish grants decide (see `authorizePublish`).
 */
export function checkPublishAllowed(setting: PublishSetting | undefined, authorization: string | undefined | null, localAddress: string | undefined, auth = false): boolean {
  if (setting === false || setting === undefined) {
    throw new RelayError('not-found', 'publishing over HTTP is disabled on this relay (enable it with the publish option)');
  }
  if (setting === true) return false;
  if (setting === 'loopback') {
    if (localAddress !== undefined && isLoopbackHost(localAddress)) return false;
    throw new RelayError('forbidden', 'publishing over HTTP is allowed by default only on a loopback listener with the in-memory broker; set the publish option to a token (or true) to allow it here');
  }
  const match = /^Bearer\s+(.+)$/i.exec(authorization ?? '');
  const given = Buffer.from(match?.[1] ?? '');
  const expected = Buffer.from(setting.token);
  if (given.length === expected.length && timingSafeEqual(given, expected)) return true;
  if (auth) return false;
  throw new RelayError('forbidden', 'publishing needs a valid bearer token');
}

/**
 * `POST /publish`: the publish option decides whether the endpoint is open (and its token
 * publishes anything); with auth on, any other bearer needs a publish grant for the topic.
 * The credentials carry no cookie (see Credentials).
 */
export async function authorizePublish(core: RelayCore, topic: string, credentials: Credentials, localAddress: string | undefined): Promise<void> {
  const viaToken = checkPublishAllowed(core.options.publish, credentials.authorization, localAddress, core.auth !== undefined);
  if (viaToken || core.auth === undefined) return;
  assertTopic(topic);
  const principal = await core.auth.authenticate(credentials);
  const refused = await core.auth.denied(principal, 'publish', [topic]);
  if (refused.length > 0) throw refused[0]!;
}

export function tooLarge(limit: number): RelayError {
  return new RelayError('too-large', `the request body is larger than ${limit} bytes`);
}
