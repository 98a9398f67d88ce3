import type { Registry } from 'prom-client';
import { credentialsFrom } from '../auth.ts';
import { RelayError, toRelayError } from '../errors.ts';
import { retryAfterHeaders } from '../limits.ts';
import type { RelayCore } from '../relay.ts';
import { SseConnection, type SinkEvents } from '../sse.ts';
import { METHODS, SSE_HEADERS, JSON_TYPE, authorizePublish, corsHeaders, endpointFor, parseUpdateBody, tooLarge } from './shared.ts';

/**
 * A fetch handler sees no socket. Its optional second argument tells it the client's address:
 * `{ clientAddress }`, or @hono/node-server's bindings (`{ incoming }`); anything else a runtime
 * passes there is ignored. Without an address (and without `limits.trustProxy` and an
 * X-Forwarded-For header), the per-address limits (maxConnectionsPerIp, publishRate) do not apply.
 */
export type FetchHandler = (request: Request, client?: FetchClient | object) => Promise<Response>;

export interface FetchClient {
  /** The client's IP address, as the runtime reports it. */
  clientAddress?: string | undefined;
}

// Bytes a web stream buffers for a reader before the connection counts as saturated.
const STREAM_HIGH_WATER_MARK = 64 * 1024;

/**
 * A web-standard `(Request) => Promise<Response>` handler for Hono, Bun, Deno and other
 * fetch-style runtimes. Requests for other paths answer 404.
 */
export function createFetchHandler(core: RelayCore, metrics: Registry): FetchHandler {
  return async (request, client) => {
    const url = new URL(request.url);
    const address = core.limits.clientAddress(remoteAddressOf(client), request.headers.get('x-forwarded-for'));
    const origin = request.headers.get('origin') ?? undefined;
    const cors = (preflight = false) => corsHeaders(origin, core.options.cors, preflight, core.auth !== undefined);
    try {
      const endpoint = endpointFor(url.pathname, core.options.paths);
      if (endpoint === undefined) throw new RelayError('not-found', `no endpoint at ${url.pathname}`);
      if (request.method === 'OPTIONS') {
        return new Response(null, { status: 204, headers: { ...cors(true), allow: [...METHODS[endpoint], 'OPTIONS'].join(', ') } });
      }
      if (!METHODS[endpoint].includes(request.method)) {
        const error = new RelayError('method-not-allowed', `${url.pathname} does not answer ${request.method}`);
        return json(error.status, error.toJSON(), { ...cors(), allow: METHODS[endpoint].join(', ') });
      }
      switch (endpoint) {
        case 'events':
          return await events(core, request, url, cors(), address);
        case 'update': {
          // Who asks, before the body is read.
          const principal = await core.authenticate(credentialsFrom((name) => request.headers.get(name), url.searchParams, true));
          const body = await readBody(request, core.options.maxBodyBytes);
          const result = await core.updateSubscriptions(parseUpdateBody(request.headers.get('content-type'), body), principal);
          return json(200, result, cors());
        }
        case 'publish': {
          core.limits.takePublish(address);
          const topic = url.searchParams.get('topic') ?? '';
          await authorizePublish(core, topic, credentialsFrom((name) => request.headers.get(name), url.searchParams, false), undefined);
          const body = await readBody(request, core.options.maxBodyBytes);
          await core.publish(topic, body);
          return new Response(null, { status: 204, headers: cors() });
        }
        case 'health':
          return json(200, { status: 'ok' }, cors());
        case 'ready': {
          const ready = core.isReady();
          return json(ready ? 200 : 503, { status: ready ? 'ready' : 'unavailable', broker_connected: core.broker.isConnected(), draining: core.isClosing }, cors());
        }
        case 'metrics':
          return new Response(await metrics.metrics(), { headers: { 'content-type': metrics.contentType, ...cors() } });
        case 'ws':
          // WebSocket upgrades are served on node:http by relay.handleUpgrade, not by the fetch handler.
          throw new RelayError('bad-request', `${url.pathname} is a WebSocket endpoint, served by relay.handleUpgrade on node:http`);
      }
    } catch (err) {
      const error = toRelayError(err);
      return json(error.status, error.toJSON(), { ...cors(), ...retryAfterHeaders(error) });
    }
  };
}

async function events(core: RelayCore, request: Request, url: URL, headers: Record<string, string>, clientAddress: string | undefined): Promise<Response> {
  let controller!: ReadableStreamDefaultController<Uint8Array>;
  let sinkEvents: SinkEvents | undefined;
  const stream = new ReadableStream<Uint8Array>(
    {
      start(c) {
        controller = c;
      },
      pull() {
        sinkEvents?.drained();
      },
      cancel() {
        sinkEvents?.gone();
      },
    },
    { highWaterMark: STREAM_HIGH_WATER_MARK, size: (chunk) => chunk.byteLength },
  );
  await core.openStream(
    {
      topics: url.searchParams.get('topics'),
      sessionId: url.searchParams.get('session_id'),
      lastEventId: request.headers.get('last-event-id') ?? url.searchParams.get('last_event_id'),
      clientAddress,
      credentials: credentialsFrom((name) => request.headers.get(name), url.searchParams, true),
    },
    (session) => {
      const connection = new SseConnection(
        {
          write(chunks) {
            try {
              for (const chunk of chunks) controller.enqueue(chunk);
            } catch {
              return false; // the reader is gone; `cancel` reports it
            }
            return (controller.desiredSize ?? 0) > 0;
          },
          end() {
            try {
              controller.close();
            } catch {
              // already closed or cancelled
            }
          },
          destroy() {
            try {
              controller.error(new Error('livepipe closed this stream: the client read too slowly'));
            } catch {
              // already closed or cancelled
            }
          },
        },
        session.idPrefix,
        core.options.outbox,
        core.deliveries,
      );
      sinkEvents = connection.events;
      request.signal.addEventListener('abort', sinkEvents.gone, { once: true });
      if (request.signal.aborted) sinkEvents.gone();
      return connection;
    },
  );
  return new Response(stream, { status: 200, headers: { ...SSE_HEADERS, ...headers } });
}

function remoteAddressOf(client: unknown): string | undefined {
  const given = client as { clientAddress?: unknown; incoming?: { socket?: { remoteAddress?: unknown } } } | null | undefined;
  const address = given?.clientAddress ?? given?.incoming?.socket?.remoteAddress;
  return typeof address === 'string' ? address : undefined;
}

async function readBody(request: Request, limit: number): Promise<Buffer> {
  const declared = Number(request.headers.get('content-length'));
  if (Number.isFinite(declared) && declared > limit) throw tooLarge(limit);
  if (request.body === null) return Buffer.alloc(0);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of request.body) {
    size += chunk.byteLength;
    if (size > limit) throw tooLarge(limit);
    chunks.push(Buffer.from(chunk));
  }
  return Buffer.concat(chunks, size);
}

function json(status: number, body: unknown, headers: Record<string, string>): Response {
  return new Response(JSON.stringify(body), { status, headers: { 'content-type': JSON_TYPE, ...headers } });
}
