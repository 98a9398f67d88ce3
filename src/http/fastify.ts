import type { IncomingMessage, ServerResponse } from 'node:http';
import type { NodeMiddleware } from './node.ts';
import type { RelayPaths } from '../options.ts';

/**
 * The part of a Fastify instance the plugin uses. Typed structurally so that livepipe
 * neither imports nor depends on fastify.
 */
export interface FastifyLike {
  readonly prefix: string;
  route(options: {
    method: string[];
    url: string;
    onRequest: (request: { raw: IncomingMessage }, reply: { raw: ServerResponse; hijack(): unknown }) => Promise<void>;
    handler: () => void;
  }): unknown;
  addHook(name: 'preClose', hook: () => Promise<void>): unknown;
}

/** What the plugin needs of a relay (a `Relay` from `createRelay`). */
export interface FastifyRelay {
  handler: NodeMiddleware;
  close(): Promise<void>;
  readonly core: { readonly options: { readonly paths: RelayPaths } };
}

// Every method the relay answers, rejects (405) or preflights, so Fastify behaves like node:http.
const ROUTE_METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'];

/**
 * A Fastify plugin serving the relay's endpoints: `await app.register(livepipeFastify(relay))`.
 *
 * Each endpoint is a route whose `onRequest` hook hijacks the reply and hands the raw request
 * and response to the relay, so Fastify neither parses the body (the relay reads it itself)
 * nor buffers the event stream. `fastify.close()` closes the relay (a `preClose` hook): open
 * streams end cleanly, otherwise they would keep the server from closing.
 */
export function livepipeFastify(relay: FastifyRelay): (fastify: FastifyLike) => Promise<void> {
  return async function livepipe(fastify) {
    // The relay routes by its own paths, which a Fastify prefix would not change.
    if (fastify.prefix !== '') {
      throw new Error(`livepipe: register livepipeFastify without a prefix (got ${JSON.stringify(fastify.prefix)}); set the relay's paths option instead`);
    }
    const onRequest = async (request: { raw: IncomingMessage }, reply: { raw: ServerResponse; hijack(): unknown }) => {
      reply.hijack();
      await relay.handler(request.raw, reply.raw);
    };
    for (const url of new Set(Object.values(relay.core.options.paths))) {
      fastify.route({ method: ROUTE_METHODS, url, onRequest, handler: () => {} });
    }
    fastify.addHook('preClose', () => relay.close());
  };
}
