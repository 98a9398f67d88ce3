import { isIP } from 'node:net';
import { RelayError } from './errors.ts';
import type { LimitOptions } from './options.ts';

/**
 * Caps and rate limits (the `limits` option). Every refusal is a 429 `rate-limited` (PROTOCOL.md
 * section 3 lists it; its message says which limit), except the older per-session topic cap
 * (`too-many-topics`) and body size (413). A refused request changes nothing and, for the token
 * buckets, costs no token. Nothing here is kept per address or session longer than it matters:
 * per-address counts vanish with the last stream, and a bucket that has refilled is dropped (it
 * is the same as no bucket).
 */

/** The `reason` label of `livepipe_rejected_total`. */
export type RejectReason = 'connections_per_ip' | 'sessions' | 'update_rate' | 'publish_rate' | 'topics_per_session';

export const REJECT_REASONS: readonly RejectReason[] = ['connections_per_ip', 'sessions', 'update_rate', 'publish_rate', 'topics_per_session'];

/** A refusal by a limit; `retryAfterSec` (when known) becomes a `Retry-After` header on HTTP. */
export class LimitError extends RelayError {
  readonly reason: RejectReason;
  readonly retryAfterSec: number | undefined;

  constructor(reason: RejectReason, message: string, retryAfterSec?: number) {
    super(reason === 'topics_per_session' ? 'too-many-topics' : 'rate-limited', message);
    this.reason = reason;
    this.retryAfterSec = retryAfterSec;
  }
}

/** Headers an HTTP adapter adds to an error response: `Retry-After` for a rate limit, readable by cross-origin pages too. */
export function retryAfterHeaders(error: RelayError): Record<string, string> {
  if (!(error instanceof LimitError) || error.retryAfterSec === undefined) return {};
  return { 'retry-after': String(error.retryAfterSec), 'access-control-expose-headers': 'Retry-After' };
}

/** A held stream slot of one address; released once when the stream ends. */
export interface ConnectionSlot {
  readonly address: string | undefined;
  release(): void;
}

interface Rate {
  perSecond: number;
  burst: number;
}

interface Bucket {
  tokens: number;
  /** When `tokens` was computed (ms, on the limits' clock). */
  at: number;
}

/**
 * A safety valve on each bucket map: addresses are cheap for a client to vary (IPv6, or a spoofed
 * X-Forwarded-For when trustProxy is on), so past this many the least recently used bucket goes.
 */
const MAX_BUCKETS = 100_000;

const NO_SLOT: ConnectionSlot = { address: undefined, release() {} };

export class Limits {
  readonly options: Readonly<LimitOptions>;
  /** Refusals so far, by reason (read by /metrics). */
  readonly rejected: Record<RejectReason, number> = { connections_per_ip: 0, sessions: 0, update_rate: 0, publish_rate: 0, topics_per_session: 0 };
  /** A monotonic clock in ms; tests replace it to move time without sleeping. */
  now: () => number = () => performance.now();
  private readonly connections = new Map<string, number>();
  private readonly updateBuckets = new Map<string, Bucket>();
  private readonly publishBuckets = new Map<string, Bucket>();

  constructor(options: LimitOptions = {}) {
    checkLimitOptions(options);
    this.options = { ...options };
  }

  /**
   * The client's address: the first X-Forwarded-For entry when `trustProxy` is on and the header
   * holds an IP address, else the socket's remote address. IPv4-mapped IPv6 counts as IPv4.
   * Undefined when neither is known (the fetch handler without a client address): per-address
   * limits then do not apply.
   */
  clientAddress(remoteAddress: string | undefined | null, forwardedFor: string | string[] | undefined | null): string | undefined {
    if (this.options.trustProxy === true && forwardedFor != null) {
      const first = (Array.isArray(forwardedFor) ? forwardedFor[0] : forwardedFor)?.split(',', 1)[0];
      const forwarded = first === undefined ? undefined : ipOf(first.trim());
      if (forwarded !== undefined) return forwarded;
    }
    return remoteAddress ? ipOf(remoteAddress) ?? remoteAddress : undefined;
  }

  /**
   * The address a new stream counts against (see clientAddress), or undefined when streams are
   * not capped per address: the socket's address is then never asked for (getpeername, a
   * syscall per stream).
   */
  streamAddress(socket: { readonly remoteAddress?: string | undefined } | null | undefined, forwardedFor: string | string[] | undefined | null): string | undefined {
    if (this.options.maxConnectionsPerIp === undefined || socket == null) return undefined;
    return this.clientAddress(socket.remoteAddress, forwardedFor);
  }

  /**
   * Takes a stream slot for `address`. `replacing` is the slot of the connection the new stream
   * takes over (a resume): from the same address it is a swap, not one more, so a client whose
   * old connection is not known to be dead yet can still come back when its address is at the cap.
   */
  openConnection(address: string | undefined, replacing?: ConnectionSlot): ConnectionSlot {
    const max = this.options.maxConnectionsPerIp;
    if (max === undefined || address === undefined) return NO_SLOT;
    const open = this.connections.get(address) ?? 0;
    if (open >= max && replacing?.address !== address) {
      throw this.reject('connections_per_ip', `too many open streams from ${address}: at most ${max} per client address; close one, or retry later`);
    }
    this.connections.set(address, open + 1);
    let held = true;
    return {
      address,
      release: () => {
        if (!held) return;
        held = false;
        const left = (this.connections.get(address) ?? 1) - 1;
        if (left > 0) this.connections.set(address, left);
        else this.connections.delete(address);
      },
    };
  }

  /** Open streams counted for `address` (for tests and diagnostics). */
  connectionsFrom(address: string): number {
    return this.connections.get(address) ?? 0;
  }

  /** Refuses a new session when `live` sessions already exist. Resumes do not create one and are never refused here. */
  checkSessions(live: number): void {
    const max = this.options.maxSessions;
    if (max !== undefined && live >= max) {
      throw this.reject('sessions', `the relay is full: it holds its maximum of ${max} sessions; retry later, or connect to another instance`);
    }
  }

  /** Takes a token for one subscription update of `sessionId` (HTTP, WebSocket frame or RPC). */
  takeUpdate(sessionId: string): void {
    const rate = this.options.updateRate;
    if (rate === undefined) return;
    const waitMs = this.take(this.updateBuckets, sessionId, rate);
    if (waitMs > 0) {
      throw this.reject('update_rate', `too many subscription updates for this session: at most ${rate.burst} at once and ${rate.perSecond} per second; retry in ${seconds(waitMs)} s`, seconds(waitMs));
    }
  }

  /** Takes a token for one HTTP publish from `address`. */
  takePublish(address: string | undefined): void {
    const rate = this.options.publishRate;
    if (rate === undefined || address === undefined) return;
    const waitMs = this.take(this.publishBuckets, address, rate);
    if (waitMs > 0) {
      throw this.reject('publish_rate', `too many publishes from ${address}: at most ${rate.burst} at once and ${rate.perSecond} per second; retry in ${seconds(waitMs)} s`, seconds(waitMs));
    }
  }

  /** Counts a refusal made elsewhere (the per-session topic cap) and returns the error to throw. */
  reject(reason: RejectReason, message: string, retryAfterSec?: number): LimitError {
    this.rejected[reason]++;
    return new LimitError(reason, message, retryAfterSec);
  }

  /** What is held in memory (for tests and diagnostics): addresses with open streams, and token buckets. */
  get tracked(): { addresses: number; updateBuckets: number; publishBuckets: number } {
    return { addresses: this.connections.size, updateBuckets: this.updateBuckets.size, publishBuckets: this.publishBuckets.size };
  }

  /** Drops buckets that have refilled: called by the relay's sweeper. */
  sweep(): void {
    const now = this.now();
    if (this.options.updateRate) dropFull(this.updateBuckets, this.options.updateRate, now);
    if (this.options.publishRate) dropFull(this.publishBuckets, this.options.publishRate, now);
  }

  /** Takes one token from `key`'s bucket: 0 when taken, else how long until one is there (ms). */
  private take(buckets: Map<string, Bucket>, key: string, rate: Rate): number {
    const now = this.now();
    const bucket = buckets.get(key);
    let tokens = rate.burst;
    if (bucket !== undefined) {
      tokens = refill(bucket, rate, now);
      buckets.delete(key); // re-inserted below: the map stays in least-recently-used order
    } else if (buckets.size >= MAX_BUCKETS) {
      buckets.delete(buckets.keys().next().value!);
    }
    const taken = tokens >= 1;
    buckets.set(key, { tokens: taken ? tokens - 1 : tokens, at: now });
    return taken ? 0 : ((1 - tokens) * 1000) / rate.perSecond;
  }
}

function refill(bucket: Bucket, rate: Rate, now: number): number {
  return Math.min(rate.burst, bucket.tokens + ((now - bucket.at) * rate.perSecond) / 1000);
}

function dropFull(buckets: Map<string, Bucket>, rate: Rate, now: number): void {
  for (const [key, bucket] of buckets) if (refill(bucket, rate, now) >= rate.burst) buckets.delete(key);
}

/** Whole seconds for Retry-After, at least 1. */
function seconds(ms: number): number {
  return Math.max(1, Math.ceil(ms / 1000));
}

/** The IP address in `text` (also `a.b.c.d:port` and `[v6]:port`, which some proxies send), IPv4-mapped IPv6 as IPv4. */
function ipOf(text: string): string | undefined {
  let ip = text;
  const bracketed = /^\[([^\]]+)\](?::\d+)?$/.exec(ip);
  if (bracketed) ip = bracketed[1]!;
  else if (/^[\d.]+:\d+$/.test(ip)) ip = ip.slice(0, ip.lastIndexOf(':'));
  const kind = isIP(ip);
  if (kind === 0) return undefined;
  const lower = ip.toLowerCase();
  if (kind === 6 && lower.startsWith('::ffff:') && isIP(lower.slice(7)) === 4) return lower.slice(7);
  return lower;
}

/** Throws a TypeError that names the key when a limit is not a usable number. */
export function checkLimitOptions(options: LimitOptions): void {
  checkCount(options.maxConnectionsPerIp, 'limits.maxConnectionsPerIp');
  checkCount(options.maxSessions, 'limits.maxSessions');
  checkRate(options.updateRate, 'limits.updateRate');
  checkRate(options.publishRate, 'limits.publishRate');
}

function checkCount(value: number | undefined, key: string): void {
  if (value !== undefined && !(Number.isInteger(value) && value >= 1)) throw new TypeError(`${key} must be a whole number of at least 1 (got ${String(value)})`);
}

function checkRate(rate: Rate | undefined, key: string): void {
  if (rate === undefined) return;
  if (!(typeof rate.perSecond === 'number' && Number.isFinite(rate.perSecond) && rate.perSecond > 0)) {
    throw new TypeError(`${key}.perSecond must be a number above 0 (got ${String(rate.perSecond)})`);
  }
  if (!(Number.isInteger(rate.burst) && rate.burst >= 1)) throw new TypeError(`${key}.burst must be a whole number of at least 1 (got ${String(rate.burst)})`);
}
