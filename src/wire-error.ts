import { RelayError, toRelayError, type ErrorCode } from './errors.ts';
import { LimitError, type RejectReason } from './limits.ts';

/** A RelayError as it crosses a process boundary (cluster IPC, scale-out control messages). */
export interface WireError {
  code: ErrorCode;
  message: string;
  topic?: string | undefined;
  count?: number | undefined;
  reason?: RejectReason | undefined;
  retryAfterSec?: number | undefined;
}

export function toWire(err: unknown): WireError {
  const error = toRelayError(err);
  const limit = error instanceof LimitError ? { reason: error.reason, retryAfterSec: error.retryAfterSec } : {};
  return { code: error.code, message: error.message, topic: error.topic, count: error.count, ...limit };
}

export function fromWire(error: WireError): RelayError {
  if (error.reason !== undefined) return new LimitError(error.reason, error.message, error.retryAfterSec);
  return new RelayError(error.code, error.message, { topic: error.topic, count: error.count });
}
