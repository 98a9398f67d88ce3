import { createHash } from 'node:crypto';
import type { QueuedConnection } from './connection.ts';
import { toRelayError } from './errors.ts';
import { parseEventId } from './frames.ts';
import type { StreamRequest } from './relay.ts';
import type { Session } from './session.ts';

/**
 * Tracing hooks. The relay does not depend on OpenTelemetry: it takes anything shaped like the
 * part of an `@opentelemetry/api` Tracer it uses, so `createRelay({ tracer: trace.getTracer('livepipe') })`
 * works, and without a tracer nothing is measured at all.
 *
 * Spans: `livepipe.stream.open`, `livepipe.update_subscriptions`, `livepipe.publish` — one per
 * request, never one per delivered message. Attributes are counts and a session fingerprint,
 * never topic names (they may name users) nor tokens.
 */

export type SpanAttributes = Record<string, string | number | boolean>;

export interface RelaySpan {
  setAttributes(attributes: SpanAttributes): unknown;
  setStatus(status: { code: number; message?: string }): unknown;
  end(): void;
}

export interface RelayTracer {
  startSpan(name: string, options?: { kind?: number; attributes?: SpanAttributes }): RelaySpan;
}

// @opentelemetry/api's SpanKind and SpanStatusCode values.
export const SPAN_KIND = { internal: 0, server: 1, client: 2, producer: 3 } as const;
const STATUS_ERROR = 2;

const NO_SPAN: Pick<RelaySpan, 'setAttributes'> = { setAttributes: () => {} };

/**
 * Runs `work` inside a span when there is a tracer. A refused request (a 4xx RelayError) is
 * recorded by its code but is not a span error: the relay did its job.
 */
export async function traced<T>(
  tracer: RelayTracer | undefined,
  name: string,
  kind: number,
  work: (span: Pick<RelaySpan, 'setAttributes'>) => Promise<T>,
): Promise<T> {
  if (tracer === undefined) return work(NO_SPAN);
  const span = tracer.startSpan(name, { kind });
  try {
    return await work(span);
  } catch (err) {
    const error = toRelayError(err);
    span.setAttributes({ 'livepipe.error.code': error.code });
    if (error.status >= 500) span.setStatus({ code: STATUS_ERROR, message: `${error.code}: ${error.message}` });
    throw err;
  } finally {
    span.end();
  }
}

/**
 * A session as spans name it: session ids are bearer secrets (PROTOCOL.md 2.2), so a trace
 * backend gets a fingerprint that correlates spans of one session but cannot be used as one.
 */
export function sessionFingerprint(sessionId: string): string {
  return createHash('sha256').update(sessionId).digest('hex').slice(0, 16);
}

/** Wraps a stream's `connect` so that the span learns the session, transport and topics once they are known. */
export function describeStream<Rest extends unknown[]>(
  span: Pick<RelaySpan, 'setAttributes'>,
  request: StreamRequest,
  connect: (session: Session, ...rest: Rest) => QueuedConnection,
): (session: Session, ...rest: Rest) => QueuedConnection {
  if (span === NO_SPAN) return connect;
  return (session, ...rest) => {
    const connection = connect(session, ...rest);
    span.setAttributes({
      'livepipe.session': sessionFingerprint(session.id),
      'livepipe.transport': connection.transport,
      'livepipe.resumed': parseEventId(request.lastEventId)?.sessionId === session.id || request.sessionId === session.id,
      'livepipe.topics.count': session.topics.size,
    });
    return connection;
  };
}
