import { constants as h2, type Http2ServerRequest, type Http2ServerResponse } from 'node:http2';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { MessageInitShape } from '@bufbuild/protobuf';
import { Code, ConnectError, cors as connectCors, createConnectRouter, createContextKey, createContextValues, type ConnectRouter, type HandlerContext } from '@connectrpc/connect';
import { universalRequestFromNodeRequest, universalResponseToNodeResponse } from '@connectrpc/connect-node';
import { credentialsFrom, type Credentials } from './auth.ts';
import { QueuedConnection, eventsLostError, type ConfigPayload, type ConnectionStats, type OutboxLimits } from './connection.ts';
import { RelayError, toRelayError, type ErrorCode } from './errors.ts';
import type { RelayMessage } from './frames.ts';
import { Relay as RelayService, StreamErrorSchema, type EventSchema, type StreamRequest, type UpdateSubscriptionsRequest } from './gen/livepipe/v1/relay_pb.ts';
import { corsHeaders } from './http/shared.ts';
import type { RelayCore } from './relay.ts';
import { assertTopic, assertTopicArray } from './topics.ts';

/**
 * gRPC, gRPC-Web and Connect (PROTOCOL.md section 5) from one ConnectRPC handler, on the same
 * sessions as SSE. Loaded on the first RPC request only, so apps that use SSE alone never load
 * protobuf code.
 */

type EventInit = MessageInitShape<typeof EventSchema>;
type NodeRequest = IncomingMessage | Http2ServerRequest;
type NodeResponse = ServerResponse | Http2ServerResponse;

/**
 * RelayError codes as gRPC status codes. The livepipe code also leads the status message
 * (`invalid-topic: …`) and travels as a `livepipe.v1.StreamError` error detail.
 */
export const GRPC_CODES: Record<ErrorCode, Code> = {
  'bad-request': Code.InvalidArgument,
  'invalid-topic': Code.InvalidArgument,
  'unknown-session': Code.NotFound,
  forbidden: Code.PermissionDenied,
  'too-large': Code.ResourceExhausted,
  'unsupported-media-type': Code.InvalidArgument,
  'too-many-topics': Code.ResourceExhausted,
  'rate-limited': Code.ResourceExhausted,
  'not-found': Code.NotFound,
  'method-not-allowed': Code.Unimplemented,
  'subscription-failure': Code.Unavailable,
  'events-lost': Code.DataLoss,
  'broker-unavailable': Code.Unavailable,
  'missing-client': Code.Internal,
  internal: Code.Internal,
};

export function toConnectError(err: unknown): ConnectError {
  if (err instanceof ConnectError) return err;
  const e = toRelayError(err);
  return new ConnectError(`${e.code}: ${e.message}`, GRPC_CODES[e.code], undefined, [{ desc: StreamErrorSchema, value: errorValue(e) }], e);
}

function errorValue(e: RelayError): MessageInitShape<typeof StreamErrorSchema> {
  return { code: e.code, message: e.message, topic: e.topic ?? '', count: e.count ?? 0 };
}

// The bodies of messages already sent to an RPC client, decoded once however many clients get them.
const bodies = new WeakMap<RelayMessage, Uint8Array>();

/**
 * A message's body, recovered from its JSON envelope: the exact bytes (UTF-8 text or base64).
 * With `embedJsonPayloads` the envelope no longer says how the body was written: a JSON body
 * comes back re-serialised compactly, and a body that is a bare JSON string loses its quotes.
 * Decoding here keeps RelayMessage free of a second copy of every body for relays that never
 * serve RPC; the decoded copy lives as long as the message stays in history.
 */
function bodyOf(message: RelayMessage): Uint8Array {
  let body = bodies.get(message);
  if (body === undefined) {
    const envelope = JSON.parse(message.envelope().toString('utf8')) as { payload?: unknown; payload_base64?: string };
    if (envelope.payload_base64 !== undefined) body = Buffer.from(envelope.payload_base64, 'base64');
    else body = Buffer.from(typeof envelope.payload === 'string' ? envelope.payload : JSON.stringify(envelope.payload));
    bodies.set(message, body);
  }
  return body;
}

/**
 * A `Stream` RPC. Connect pulls events from `events()` and writes each one, awaiting the
 * socket's drain, before it pulls the next; so a batch is handed over whole and the outbox is
 * told it may write again only when connect has taken all of it. A reader that stops reading
 * therefore leaves the rest in the bounded outbox, where the oldest are dropped.
 */
export class ConnectStreamConnection extends QueuedConnection {
  readonly transport: string;
  private readonly sessionId: string;
  private readonly reset: () => void;
  /** Events handed over but not yet pulled by connect. */
  private out: EventInit[] = [];
  private wake: (() => void) | undefined;

  /** `protocol` is connect's protocol name ("grpc", "grpc-web", "connect"); `reset` tears the HTTP stream down at once. */
  constructor(protocol: string, sessionId: string, signal: AbortSignal, reset: () => void, limits: OutboxLimits, stats: ConnectionStats) {
    super(limits, stats);
    this.transport = protocol;
    this.sessionId = sessionId;
    this.reset = reset;
    // The signal fires when the client goes away, and when the call ends for any other reason.
    if (signal.aborted) this.gone();
    else signal.addEventListener('abort', () => this.left(), { once: true });
  }

  open(config: ConfigPayload, id: string): void {
    this.push({
      event: {
        case: 'config',
        value: {
          sessionId: config.session_id,
          subscriptions: config.subscriptions,
          resumed: config.resumed,
          heartbeatMs: config.heartbeat_ms,
          sessionTtlMs: config.session_ttl_ms,
          id,
        },
      },
    });
  }

  protected heartbeat(): boolean {
    this.push({ event: { case: 'heartbeat', value: {} } });
    return false; // like writeBatch: saturated until connect has pulled it
  }

  protected writeBatch(items: (RelayMessage | RelayError)[], lost: number): boolean {
    if (lost > 0) this.push(errorEvent(eventsLostError(lost)));
    for (const item of items) {
      if (item instanceof RelayError) this.push(errorEvent(item));
      else this.push({ event: { case: 'message', value: { id: `${this.sessionId}.${item.idSuffix}`, topic: item.topic, payload: bodyOf(item) } } });
    }
    // Saturated until connect has pulled all of it (see events()).
    return false;
  }

  protected end(abort: boolean): void {
    // A clean end lets connect write what it was handed, then the OK status; an abort resets the
    // stream now, since a reader this far behind would not read a clean end either.
    if (abort) this.reset();
    this.wakeUp();
  }

  /** What connect writes: the events as they come, until the connection ends. */
  async *events(): AsyncGenerator<EventInit> {
    try {
      for (;;) {
        if (this.out.length > 0) {
          const batch = this.out;
          this.out = [];
          yield* batch;
          continue;
        }
        if (this.closed) return;
        // Connect pulled again, so it wrote everything it was given: the outbox may write more.
        this.drained();
        if (this.out.length > 0) continue;
        await new Promise<void>((resolve) => (this.wake = resolve));
      }
    } finally {
      this.left();
    }
  }

  private push(event: EventInit): void {
    if (this.closed) return;
    this.out.push(event);
    this.wakeUp();
  }

  private left(): void {
    this.gone();
    this.wakeUp();
  }

  private wakeUp(): void {
    const wake = this.wake;
    this.wake = undefined;
    wake?.();
  }
}

function errorEvent(error: RelayError): EventInit {
  return { event: { case: 'error', value: errorValue(error) } };
}

// The node request of a call, so that a stream can be reset from inside the handler.
const NODE_REQUEST = createContextKey<NodeRequest | undefined>(undefined, { description: 'livepipe node request' });

function clientAddressOf(core: RelayCore, req: NodeRequest | undefined): string | undefined {
  return core.limits.streamAddress(req?.socket, req?.headers['x-forwarded-for']);
}

/** A call's bearer: the Authorization header, the access_token query parameter (Connect GET) or cookie (browsers' gRPC-Web). */
function credentialsOf(context: HandlerContext): Credentials {
  return credentialsFrom((name) => context.requestHeader.get(name), new URL(context.url, 'http://relay').searchParams, true);
}

function resetStream(req: NodeRequest | undefined): void {
  if (req === undefined) return;
  if ('stream' in req) req.stream.close(h2.NGHTTP2_CANCEL);
  else req.socket.destroy();
}

/** The livepipe.v1.Relay service on a relay core. */
export function relayRoutes(core: RelayCore): (router: ConnectRouter) => void {
  return (router) =>
    router.service(RelayService, {
      async *stream(request: StreamRequest, context: HandlerContext) {
        let connection: ConnectStreamConnection | undefined;
        try {
          await core.openStream(
            {
              // Checked one by one: a comma inside a topic must not split it into two.
              topics: request.topics.length === 0 ? null : request.topics.map(assertTopic).join(','),
              sessionId: request.sessionId || null,
              lastEventId: request.lastEventId || null,
              clientAddress: clientAddressOf(core, context.values.get(NODE_REQUEST)),
              credentials: credentialsOf(context),
            },
            (session) => {
              const req = context.values.get(NODE_REQUEST);
              connection = new ConnectStreamConnection(context.protocolName, session.id, context.signal, () => resetStream(req), core.options.outbox, core.deliveries);
              return connection;
            },
          );
        } catch (err) {
          throw toConnectError(err);
        }
        yield* connection!.events();
      },

      async updateSubscriptions(request: UpdateSubscriptionsRequest, context: HandlerContext) {
        try {
          const principal = await core.authenticate(credentialsOf(context));
          if (request.sessionId === '') throw new RelayError('bad-request', 'session_id is missing');
          const result = await core.updateSubscriptions({
            sessionId: request.sessionId,
            add: assertTopicArray(request.add, 'add'),
            remove: assertTopicArray(request.remove, 'remove'),
          }, principal);
          return { sessionId: result.session_id, subscriptions: result.subscriptions, failed: result.failed };
        } catch (err) {
          throw toConnectError(err);
        }
      },
    });
}

export type ConnectNodeHandler = (req: NodeRequest, res: NodeResponse) => void;

/**
 * A node:http / node:http2 handler serving the Relay service over gRPC, gRPC-Web and Connect,
 * with the relay's CORS policy. It does what connect-node's connectNodeAdapter does, except that
 * a client that hangs up mid-stream is not logged as a failure (it is how streams end), and that
 * grpc-message trailers are encoded as the gRPC spec says so that grpc-js clients can read them.
 */
export function createConnectNodeHandler(core: RelayCore): ConnectNodeHandler {
  const router = createConnectRouter({
    // A request is as large as an update_subscriptions body may be.
    readMaxBytes: core.options.maxBodyBytes,
    // No compression: a relay writes each message to many clients, and compressing it once per
    // client costs more CPU than fan-out saves in bytes.
    acceptCompression: [],
  });
  relayRoutes(core)(router);
  const methods = new Map(router.handlers.map((h) => [h.requestPath, h]));

  return (req, res) => {
    const origin = req.headers.origin;
    if (req.method === 'OPTIONS') {
      const headers = corsHeaders(origin, core.options.cors, true, core.auth !== undefined);
      if (headers['access-control-allow-origin'] !== undefined) {
        headers['access-control-allow-methods'] = connectCors.allowedMethods.join(', ');
        headers['access-control-allow-headers'] = [...connectCors.allowedHeaders, 'Authorization'].join(', ');
      }
      res.statusCode = 204;
      for (const [name, value] of Object.entries(headers)) res.setHeader(name, value);
      res.end();
      return;
    }
    const headers = corsHeaders(origin, core.options.cors, false, core.auth !== undefined);
    if (headers['access-control-allow-origin'] !== undefined) headers['access-control-expose-headers'] = connectCors.exposedHeaders.join(', ');
    for (const [name, value] of Object.entries(headers)) res.setHeader(name, value);

    const method = methods.get((req.url ?? '').split('?', 1)[0]!);
    if (method === undefined) {
      res.statusCode = 404;
      res.end();
      return;
    }
    fixGrpcMessage(res);
    const uReq = universalRequestFromNodeRequest(req, res, undefined, createContextValues().set(NODE_REQUEST, req));
    method(uReq)
      .then((uRes) => universalResponseToNodeResponse(uRes, res))
      .catch((err: unknown) => {
        // Writes fail when the client hung up or its stream was reset: the end of a stream, not an error.
        if (uReq.signal.aborted || req.destroyed) return;
        // The path only: the query may hold an access_token.
        process.stderr.write(`livepipe: ${(req.url ?? '').split('?', 1)[0]} failed: ${(err as Error).stack ?? String(err)}\n`);
      });
  };
}

/**
 * Connect percent-encodes grpc-message with encodeURIComponent, and grpc-js decodes it with
 * decodeURI, which leaves `:`, `,`, `;` … encoded. The gRPC spec encodes only bytes outside
 * printable ASCII and `%`, which every client decodes alike.
 */
function fixGrpcMessage(res: NodeResponse): void {
  const addTrailers = res.addTrailers.bind(res) as (trailers: Record<string, string | string[] | undefined>) => void;
  res.addTrailers = ((trailers: Record<string, string | string[] | undefined>) => {
    const message = trailers['grpc-message'];
    if (typeof message === 'string') trailers['grpc-message'] = grpcPercentEncode(decodeURIComponent(message));
    addTrailers(trailers);
  }) as typeof res.addTrailers;
}

function grpcPercentEncode(text: string): string {
  let out = '';
  for (const byte of Buffer.from(text, 'utf8')) {
    out += byte >= 0x20 && byte <= 0x7e && byte !== 0x25 ? String.fromCharCode(byte) : `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}
