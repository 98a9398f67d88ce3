import { randomBytes } from 'node:crypto';
import type { QueuedConnection } from './connection.ts';
import { idPrefix, type RelayMessage } from './frames.ts';

let idPrefixBytes = Buffer.alloc(0);

/**
 * Bytes put before the random part of every new session id in this process: a cluster worker
 * (src/server/cluster.ts) names itself there, so that any worker can route a request to the
 * session's owner. Ids stay opaque to clients.
 */
export function setSessionIdPrefix(bytes: Buffer): void {
  idPrefixBytes = Buffer.from(bytes);
}

const RANDOM_BYTES = 16;
/** Random bytes for the next ids, drawn 256 ids at a time: one call per id was ~2% of a stream open. */
let pool = Buffer.alloc(0);
let taken = 0;

/** Session ids carry 128 random bits (PROTOCOL.md 2.2): they are bearer secrets. */
export function newSessionId(prefix: Buffer = idPrefixBytes): string {
  if (taken + RANDOM_BYTES > pool.length) {
    pool = randomBytes(RANDOM_BYTES * 256);
    taken = 0;
  }
  const random = pool.subarray(taken, (taken += RANDOM_BYTES));
  return (prefix.length === 0 ? random : Buffer.concat([prefix, random])).toString('base64url');
}

/**
 * A client's subscriptions and its position in the message sequence. It outlives its
 * connection by the TTL so that a client that reconnects resumes where it was.
 */
export class Session {
  readonly id: string;
  readonly idPrefix: Buffer;
  /** Subscribed topics, each with the sequence number at which it was subscribed (nothing earlier is replayed). */
  readonly topics = new Map<string, number>();
  /** The attached connection; at most one, the newest. */
  connection: QueuedConnection | undefined;
  /** Sequence number of the last message handed to a connection. */
  position: number;
  /** Who opened the session, when authorization is on; updates must come from the same identity. */
  readonly identity: string | undefined;
  expiryTimer: NodeJS.Timeout | undefined;
  /** Serialises subscription updates so concurrent requests apply one after the other. */
  private updates: Promise<unknown> = Promise.resolve();

  constructor(id: string, position: number, identity?: string) {
    this.id = id;
    this.idPrefix = idPrefix(id);
    this.position = position;
    this.identity = identity;
  }

  /**
   * A session taken over from a node that died, on a broker that keeps history: per topic, the
   * broker position up to which its history was replayed (positions order messages within a
   * topic). Undefined otherwise.
   */
  replayedUpTo: Map<string, number> | undefined;

  /** Hands a message to the attached connection; a detached session picks it up from history on resume. */
  deliver(message: RelayMessage): void {
    const connection = this.connection;
    if (connection === undefined || this.hasHad(message)) return;
    this.position = message.seq;
    connection.send(message);
  }

  /** True for a message that the broker's history already replayed to this session. */
  hasHad(message: RelayMessage): boolean {
    if (this.replayedUpTo === undefined || message.position === undefined) return false;
    return message.position <= (this.replayedUpTo.get(message.topic) ?? -1);
  }

  /** Runs `update` after every earlier update of this session has finished. */
  serialize<T>(update: () => Promise<T>): Promise<T> {
    const run = this.updates.then(update, update);
    this.updates = run.catch(() => {});
    return run;
  }
}
