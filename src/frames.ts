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

  constructor(seq: number, topic: string, body: Uint8Array, embedJson: boolean, receivedAt: number) {
    this.seq = seq;
    this.topic = topic;
    this.receivedAt = receivedAt;
    const head = `${seq}\ndata: `;
    this.jsonStart = Buffer.byteLength(head);
    this.sseTail = Buffer.from(`${head}${encodeEnvelope(topic, body, embedJson)}\n\n`);
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

/** An event id as clients see it: `<session id>.<sequence>`. */
export function eventId(sessionId: string, seq: number): string {
  return `${sessionId}.${seq}`;
}

/** Splits a Last-Event-ID into session id and sequence, or undefined when it is not ours. */
export function parseEventId(id: string | null | undefined): { sessionId: string; seq: number } | undefined {
  if (!id) return undefined;
  const dot = id.lastIndexOf('.');
  if (dot <= 0) return undefined;
  const seq = Number(id.slice(dot + 1));
  if (!Number.isSafeInteger(seq) || seq < 0) return undefined;
  return { sessionId: id.slice(0, dot), seq };
}

/** The first bytes of a stream: the reconnect delay, then the config event. */
export function configFrame(retryMs: number, id: string, payload: ConfigPayload): Buffer {
  return Buffer.from(`retry: ${retryMs}\nid: ${id}\ndata: ${JSON.stringify({ topic: CONFIG_TOPIC, payload })}\n\n`);
}

export function errorFrame(error: RelayError): Buffer {
  return Buffer.from(`data: ${JSON.stringify(error.toJSON())}\n\n`);
}
