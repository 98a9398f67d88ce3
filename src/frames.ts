import { isUtf8 } from 'node:buffer';
import type { ConfigPayload } from './connection.ts';
import type { RelayError } from './errors.ts';

/**
 * SSE wire format of PROTOCOL.md section 2.1. A message is encoded once into a tail that
 * every subscriber shares; only the short `id: <session>.` prefix is per session, and it is
 * itself built once per session. Together they read `id: <session>.<seq>\ndata: {…}\n\n`.
 */

export const CONFIG_TOPIC = '/httpsub/config';
export const HEARTBEAT_FRAME = Buffer.from(':\n\n');

/** One broker message as the relay carries it: numbered, encoded once, immutable. */
export class RelayMessage {
  readonly seq: number;
  readonly topic: string;
  /** `<seq>\ndata: <json>\n\n`, written after a session's id prefix. */
  readonly sseTail: Buffer;
  /** Where the JSON envelope starts inside sseTail (for transports that frame it differently). */
  private readonly jsonStart: number;
  readonly receivedAt: number;
  /** Where the broker keeps this message, when it keeps history (Broker.replay); also in the event id. */
  readonly position: number | undefined;
  /** What follows `<session id>.` in this message's event id (see eventId). */
  readonly idSuffix: string;

  /** `envelope` is the `{"topic":…,"payload":…}` JSON (see fromBody). */
  constructor(seq: number, topic: string, envelope: string, receivedAt: number, position?: number) {
    this.seq = seq;
    this.topic = topic;
    this.receivedAt = receivedAt;
    this.position = position;
    this.idSuffix = position === undefined ? String(seq) : `${seq}.${position}.${topicTag(topic)}`;
    const head = `${this.idSuffix}\ndata: `;
    this.jsonStart = Buffer.byteLength(head);
    this.sseTail = Buffer.from(`${head}${envelope}\n\n`);
  }

  /** A broker message body, encoded as PROTOCOL.md 2.1 says. */
  static fromBody(seq: number, topic: string, body: Uint8Array, embedJson: boolean, receivedAt: number, position?: number): RelayMessage {
    return new RelayMessage(seq, topic, encodeEnvelope(topic, body, embedJson), receivedAt, position);
  }

  /** The `{"topic":…,"payload":…}` JSON of this message, without copying it. */
  envelope(): Buffer {
    return this.sseTail.subarray(this.jsonStart, this.sseTail.length - 2);
  }

  get byteLength(): number {
    return this.sseTail.length;
  }
}

function encodeEnvelope(topic: string, body: Uint8Array, embedJson: boolean): string {
  const buf = Buffer.isBuffer(body) ? body : Buffer.from(body.buffer, body.byteOffset, body.byteLength);
  const t = JSON.stringify(topic);
  if (!isUtf8(buf)) return `{"topic":${t},"payload_base64":${JSON.stringify(buf.toString('base64'))}}`;
  const text = buf.toString('utf8');
  if (embedJson) {
    const value = parseJson(text);
    // Re-serialised so the envelope stays on one `data:` line whatever the body's whitespace.
    if (value !== undefined) return `{"topic":${t},"payload":${JSON.stringify(value)}}`;
  }
  return `{"topic":${t},"payload":${JSON.stringify(text)}}`;
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** The per-session `id: <session>.` prefix; the message's sseTail completes the line. */
export function idPrefix(sessionId: string): Buffer {
  return Buffer.from(`id: ${sessionId}.`);
}

/**
 * An event id as clients see it: `<session id>.<sequence>`. Where the broker keeps history, a
 * message's id goes on with `.<broker position>.<topic tag>` (so that another node can resume
 * from the broker after this one died, knowing which topic the position is exact for); a
 * config event's with `.<broker position>`.
 */
export function eventId(sessionId: string, seq: number, position?: number): string {
  return position === undefined ? `${sessionId}.${seq}` : `${sessionId}.${seq}.${position}`;
}

export interface ParsedEventId {
  sessionId: string;
  seq: number;
  position: number | undefined;
  /** topicTag() of the topic of the message, when the id is a message's with a position. */
  topicTag: string | undefined;
}

/** Splits a Last-Event-ID into its parts (see eventId), or undefined when it is not ours. */
export function parseEventId(id: string | null | undefined): ParsedEventId | undefined {
  if (!id) return undefined;
  const parts = id.split('.');
  if (parts.length < 2 || parts.length > 4 || parts[0] === '') return undefined;
  const seq = Number(parts[1]);
  const position = parts.length > 2 ? Number(parts[2]) : undefined;
  if (!isCount(seq) || (position !== undefined && !isCount(position))) return undefined;
  return { sessionId: parts[0]!, seq, position, topicTag: parts[3] };
}

/** A short tag naming a topic in event ids: FNV-1a (32 bits) of its UTF-8 bytes, in base 36. */
export function topicTag(topic: string): string {
  let hash = 0x811c9dc5;
  for (const byte of Buffer.from(topic, 'utf8')) hash = Math.imul(hash ^ byte, 0x01000193);
  return (hash >>> 0).toString(36);
}

function isCount(n: number | undefined): boolean {
  return Number.isSafeInteger(n) && n! >= 0;
}

/** The first bytes of a stream: the reconnect delay, then the config event. */
export function configFrame(retryMs: number, id: string, payload: ConfigPayload): Buffer {
  return Buffer.from(`retry: ${retryMs}\nid: ${id}\ndata: ${JSON.stringify({ topic: CONFIG_TOPIC, payload })}\n\n`);
}

export function errorFrame(error: RelayError): Buffer {
  return Buffer.from(`data: ${JSON.stringify(error.toJSON())}\n\n`);
}
