/**
 * Error codes of PROTOCOL.md. Errors are values with a code; the wire never carries a stack.
 */
export type ErrorCode =
  | 'bad-request'
  | 'invalid-topic'
  | 'unknown-session'
  | 'forbidden'
  | 'too-large'
  | 'unsupported-media-type'
  | 'too-many-topics'
  | 'rate-limited'
  | 'not-found'
  | 'method-not-allowed'
  | 'subscription-failure'
  | 'events-lost'
  | 'broker-unavailable'
  | 'missing-client'
  | 'internal';

const STATUS: Record<ErrorCode, number> = {
  'bad-request': 400,
  'invalid-topic': 400,
  'unknown-session': 404,
  forbidden: 403,
  'too-large': 413,
  'unsupported-media-type': 415,
  'too-many-topics': 429,
  'rate-limited': 429,
  'not-found': 404,
  'method-not-allowed': 405,
  'subscription-failure': 502,
  'events-lost': 500,
  'broker-unavailable': 503,
  'missing-client': 500,
  internal: 500,
};

export function isErrorCode(value: string): value is ErrorCode {
  return Object.hasOwn(STATUS, value);
}

export class RelayError extends Error {
  readonly code: ErrorCode;
  readonly topic: string | undefined;
  /** For `events-lost`: how many events, where known. */
  readonly count: number | undefined;

  constructor(code: ErrorCode, message: string, options?: { topic?: string; count?: number; cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'RelayError';
    this.code = code;
    this.topic = options?.topic;
    this.count = options?.count;
  }

  get status(): number {
    return STATUS[this.code];
  }

  /** The `{"error":{…}}` body of PROTOCOL.md. */
  toJSON(): { error: { code: ErrorCode; message: string; topic?: string; count?: number } } {
    const error: { code: ErrorCode; message: string; topic?: string; count?: number } = { code: this.code, message: this.message };
    if (this.topic !== undefined) error.topic = this.topic;
    if (this.count !== undefined) error.count = this.count;
    return { error };
  }
}

/** Turns anything thrown into a RelayError without leaking internals onto the wire. */
export function toRelayError(err: unknown, fallback: ErrorCode = 'internal'): RelayError {
  if (err instanceof RelayError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new RelayError(fallback, message, { cause: err });
}
