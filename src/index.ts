import type { Registry } from 'prom-client';
import { createRpcMiddleware, type RpcMiddleware } from './http/connect.ts';
import type { Server } from 'node:http';
import { serveStreamsFast, type FastStreamOptions } from './http/fast-streams.ts';
import { createFetchHandler, type FetchHandler } from './http/fetch.ts';
import { createNodeHandlers, type NodeHandler, type NodeMiddleware } from './http/node.ts';
import { createMetrics } from './metrics.ts';
import type { RelayOptions } from './options.ts';
import { createRelayCore, type CloseOptions, type RelayCore, type RelayStats, type UpdateRequest, type UpdateResult } from './relay.ts';
import { createWsTransport, type UpgradeHandler } from './ws.ts';

export interface Relay {
  /** Every endpoint, routed by path. Express / Connect middleware: calls `next` for other paths. */
  handler: NodeMiddleware;
  /** `GET /events` alone, for frameworks that route themselves. */
  handleEvents: NodeHandler;
  /** `POST /update_subscriptions` alone. */
  handleUpdate: NodeHandler;
  /** `POST /publish` alone. */
  handlePublish: NodeHandler;
  /** Web-standard handler for Hono, Bun, Deno and edge runtimes. */
  fetch: FetchHandler;
  /**
   * WebSocket at `GET /ws`: wire to node:http's `server.on('upgrade', …)`. Returns false, leaving
   * the socket alone, when the request is for another path.
   */
  handleUpgrade: UpgradeHandler;
  /**
   * The `livepipe.v1.Relay` service over gRPC, gRPC-Web and Connect, for node:http (Connect and
   * gRPC-Web) or node:http2 (all three). Calls `next` for other paths. Loads ConnectRPC on first use.
   */
  connectHandler(): RpcMiddleware;
  /**
   * Serves `GET /events` on a plain-HTTP node:http server (yours, Express's `app.listen()`,
   * Fastify's `fastify.server`) straight from each connection's socket, before node:http parses
   * it: about twice the stream opens a second on one core (bench/README.md, W4). Same head,
   * same body, same errors; every other request still reaches the server's own handlers, and
   * its other 'connection' listeners still hear every connection. Returns false, changing
   * nothing, for a server it cannot do this for (HTTPS, HTTP/2).
   */
  serveStreamsFast(server: Server, options?: FastStreamOptions): boolean;
  /** Changes a session's topics, as `POST /update_subscriptions` does; the app's own call, so `auth` does not apply. */
  updateSubscriptions(request: UpdateRequest): Promise<UpdateResult>;
  /** Publishes through the relay's broker; the app's own call, so `auth` does not apply. */
  publish(topic: string, body: Uint8Array | string): Promise<void>;
  stats(): RelayStats;
  /** The Prometheus registry behind `/metrics`. */
  readonly metrics: Registry;
  /** True while the broker is connected and the relay is not shutting down. */
  isReady(): boolean;
  /**
   * Ends open streams, releases broker subscriptions and closes a broker opened from a URL. With
   * `reconnectDelayMs`, SSE clients are told to reconnect within that delay (to another instance).
   */
  close(options?: CloseOptions): Promise<void>;
  /** The underlying core, for transports built on top. */
  readonly core: RelayCore;
}

/** Creates a relay over a broker URL (`mem://`, `nats://…`) or an opened Broker. */
export async function createRelay(options: RelayOptions): Promise<Relay> {
  const core = await createRelayCore(options);
  const metrics = createMetrics(core);
  const node = createNodeHandlers(core, metrics);
  return {
    handler: node.handler,
    handleEvents: node.events,
    handleUpdate: node.update,
    handlePublish: node.publish,
    fetch: createFetchHandler(core, metrics),
    handleUpgrade: createWsTransport(core).handleUpgrade,
    connectHandler: () => createRpcMiddleware(core),
    serveStreamsFast: (server, fastOptions) => serveStreamsFast(server, core, fastOptions),
    updateSubscriptions: (request) => core.updateSubscriptions(request),
    publish: (topic, body) => core.publish(topic, typeof body === 'string' ? Buffer.from(body) : body),
    stats: () => core.stats(),
    metrics,
    isReady: () => core.isReady(),
    close: (options) => core.close(options),
    core,
  };
}

export type { RelayOptions, RelayPaths, CorsOptions } from './options.ts';
export type { AuthOptions } from './options.ts';
export type { Credentials, Principal } from './auth.ts';
export type { RelayStats, UpdateRequest, UpdateResult, StreamRequest, RelayCore, CloseOptions } from './relay.ts';
export type { RelayTracer, RelaySpan, SpanAttributes } from './tracer.ts';
export { RelayError, type ErrorCode } from './errors.ts';
export { CLOSE_CODES, type UpgradeHandler } from './ws.ts';
export type { LimitOptions } from './options.ts';
export { LimitError, type RejectReason } from './limits.ts';
export type { FetchClient, FetchHandler } from './http/fetch.ts';
export type { FastStreamOptions } from './http/fast-streams.ts';
export type { StreamHead } from './http/stream-head.ts';
export { RELAY_SERVICE_PATH, type RpcMiddleware } from './http/connect.ts';
export { topicProblem, MAX_TOPIC_BYTES } from './topics.ts';
export { livepipeFastify, type FastifyLike, type FastifyRelay } from './http/fastify.ts';
export * from './brokers/index.ts';
