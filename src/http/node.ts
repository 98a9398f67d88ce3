import type { IncomingMessage, ServerResponse } from 'node:http';
import { createRequire } from 'node:module';
import type { Socket } from 'node:net';
import type { Registry } from 'prom-client';
import { credentialsFrom } from '../auth.ts';
import { RelayError, toRelayError } from '../errors.ts';
import { retryAfterHeaders } from '../limits.ts';
import type { RelayCore } from '../relay.ts';
import { SseConnection, type ByteSink } from '../sse.ts';
import { COPY_LIMIT, SocketSink, byteLength, chunkOf, ownSocket, socketStream, uncork } from './socket-stream.ts';
import { METHODS, SSE_HEADERS, JSON_TYPE, authorizePublish, corsHeaders, endpointFor, parseUpdateBody, tooLarge } from './shared.ts';

export type NodeHandler = (req: IncomingMessage, res: ServerResponse) => Promise<void>;
export type NodeMiddleware = (req: IncomingMessage, res: ServerResponse, next?: (err?: unknown) => void) => Promise<void>;

export interface NodeHandlers {
  /** Every endpoint by path; calls `next` (Express / Connect style) or answers 404 for other paths. */
  handler: NodeMiddleware;
  events: NodeHandler;
  update: NodeHandler;
  publish: NodeHandler;
}

/** node:http request handlers; also fit Express, Connect and Fastify's raw request/response. */
export function createNodeHandlers(core: RelayCore, metrics: Registry): NodeHandlers {
  const cors = (req: IncomingMessage, preflight = false) => corsHeaders(req.headers.origin, core.options.cors, preflight, core.auth !== undefined);
  const credentials = (req: IncomingMessage, url: URL, cookie: boolean) => credentialsFrom((name) => header(req, name), url.searchParams, cookie);
  const clientAddress = (req: IncomingMessage) => core.limits.clientAddress(req.socket.remoteAddress, req.headers['x-forwarded-for']);

  const events: NodeHandler = async (req, res) => {
    const url = new URL(req.url ?? '/', 'http://relay');
    const lastEventId = header(req, 'last-event-id') ?? url.searchParams.get('last_event_id');
    try {
      await core.openStream(
        { topics: url.searchParams.get('topics'), sessionId: url.searchParams.get('session_id'), lastEventId, clientAddress: core.limits.streamAddress(req.socket, req.headers['x-forwarded-for']), credentials: credentials(req, url, true) },
        (session) => {
          const headers = { ...SSE_HEADERS, ...cors(req) };
          // No TCP keep-alive: heartbeats keep the connection busy, and a busy connection never probes.
          req.socket.setNoDelay(true);
          const sink = takeOver(req, res, headers);
          if (sink !== undefined) return socketStream(core, session, sink);
          res.writeHead(200, headers);
          const connection = new SseConnection(responseSink(res), session.idPrefix, core.options.outbox, core.deliveries);
          const { drained, gone } = connection.events;
          res.on('drain', drained);
          res.once('close', gone);
          if (isGone(res) || req.socket.destroyed) gone();
          return connection;
        },
      );
    } catch (err) {
      sendError(res, toRelayError(err), cors(req));
    }
  };

  const update: NodeHandler = async (req, res) => {
    try {
      // Who asks, before the body is read.
      const principal = await core.authenticate(credentials(req, new URL(req.url ?? '/', 'http://relay'), true));
      const body = await readBody(req, core.options.maxBodyBytes);
      const result = await core.updateSubscriptions(parseUpdateBody(header(req, 'content-type'), body), principal);
      sendJson(res, 200, result, cors(req));
    } catch (err) {
      sendError(res, toRelayError(err), cors(req));
    }
  };

  const publish: NodeHandler = async (req, res) => {
    try {
      // The cheapest refusal first: before the bearer is checked or the body read.
      core.limits.takePublish(clientAddress(req));
      const url = new URL(req.url ?? '/', 'http://relay');
      const topic = url.searchParams.get('topic');
      await authorizePublish(core, topic ?? '', credentials(req, url, false), req.socket.localAddress);
      const body = await readBody(req, core.options.maxBodyBytes);
      await core.publish(topic ?? '', Buffer.isBuffer(body) ? body : Buffer.from(typeof body === 'string' ? body : JSON.stringify(body)));
      res.writeHead(204, cors(req)).end();
    } catch (err) {
      sendError(res, toRelayError(err), cors(req));
    }
  };

  const handler: NodeMiddleware = async (req, res, next) => {
    const { pathname } = new URL(req.url ?? '/', 'http://relay');
    const endpoint = endpointFor(pathname, core.options.paths);
    if (endpoint === undefined) {
      if (next) return next();
      return sendError(res, new RelayError('not-found', `no endpoint at ${pathname}`), cors(req));
    }
    const method = req.method ?? 'GET';
    if (method === 'OPTIONS') {
      res.writeHead(204, { ...cors(req, true), allow: [...METHODS[endpoint], 'OPTIONS'].join(', ') }).end();
      return;
    }
    if (!METHODS[endpoint].includes(method)) {
      res.setHeader('allow', METHODS[endpoint].join(', '));
      return sendError(res, new RelayError('method-not-allowed', `${pathname} does not answer ${method}`), cors(req));
    }
    switch (endpoint) {
      case 'events':
        return events(req, res);
      case 'update':
        return update(req, res);
      case 'publish':
        return publish(req, res);
      case 'health':
        return sendJson(res, 200, { status: 'ok' }, cors(req));
      case 'ready': {
        const ready = core.isReady();
        return sendJson(res, ready ? 200 : 503, { status: ready ? 'ready' : 'unavailable', broker_connected: core.broker.isConnected(), draining: core.isClosing }, cors(req));
      }
      case 'metrics': {
        try {
          const text = await metrics.metrics();
          res.writeHead(200, { 'content-type': metrics.contentType, ...cors(req) }).end(text);
        } catch (err) {
          sendError(res, toRelayError(err), cors(req));
        }
        return;
      }
      case 'ws':
        // Only a request without `Upgrade: websocket` gets here: upgrades go to relay.handleUpgrade.
        return sendError(res, new RelayError('bad-request', `${pathname} is a WebSocket endpoint: connect with a WebSocket client`), cors(req));
    }
  };

  return { handler, events, update, publish };
}

/** True once the client is gone. An HTTP/2 response (node:http2's compatibility API) has no `destroyed`: its stream has. */
function isGone(res: ServerResponse): boolean {
  return res.destroyed || ((res as { stream?: { destroyed: boolean } }).stream?.destroyed ?? false);
}

/**
 * The stream through the response: HTTP/2, and HTTP/1 streams that takeOver leaves alone.
 * Writes a batch as one buffer with one socket write. Going through the response costs four
 * socket writes per chunk (size line, CRLF, data, CRLF) and, corked, a writev gathering them:
 * in the fan-out profile that stream machinery, not the syscall, was most of the time. So
 * once the response head is out (the first write, the config event, goes through the
 * response), the sink frames the batch as one HTTP chunk itself and writes it straight to the
 * socket: copying ~100 bytes per message costs less than the writes it saves (batches over
 * COPY_LIMIT keep the uncopied path). Only a write
 * that leaves the socket below its high-water mark goes straight there; one that would fill
 * it goes through the response, so that saturation and 'drain' stay the response's (as slow
 * readers need). The response still ends the stream (its end() adds the last chunk).
 * HTTP/2 responses have no socket of their own (their stream frames them): response path.
 */
function responseSink(res: ServerResponse): ByteSink {
  const socket = res.req?.httpVersionMajor === 2 ? undefined : res.socket;
  let headSent = false;
  return {
    write(chunks) {
      if (isGone(res)) return false;
      if (socket && headSent && res.chunkedEncoding) {
        const size = byteLength(chunks);
        // Copying is cheap only for small batches: a large body goes out uncopied through the writev below.
        if (size <= COPY_LIMIT && socket.writableLength + size < socket.writableHighWaterMark) return socket.write(chunkOf(chunks, size));
      }
      let ok = true;
      socket?.cork();
      for (const chunk of chunks) ok = res.write(chunk);
      socket?.uncork();
      headSent = true;
      return ok;
    },
    end() {
      if (!isGone(res)) res.end();
    },
    destroy() {
      res.destroy();
    },
  };
}

/**
 * The node:http internals a stream takes its socket from: what node's own upgrade path (the
 * one `ws` relies on) uses to hand a socket over, reached from here because an SSE request is
 * not an upgrade.
 */
interface HttpSocket extends Socket {
  parser?: { finish(): unknown } | null;
  _httpMessage?: unknown;
  server?: { closeAllConnections?: () => void };
}
/** node:http's own helper (as its upgrade path frees a parser); undefined on a runtime without it, and then nothing is taken over. */
const freeParser = ((): ((parser: unknown, req: unknown, socket: unknown) => void) | undefined => {
  try {
    return (createRequire(import.meta.url)('_http_common') as { freeParser?: (parser: unknown, req: unknown, socket: unknown) => void }).freeParser;
  } catch {
    return undefined;
  }
})();

/** The listeners node:http puts on each connection's socket (connectionListenerInternal in lib/_http_server.js), by name. */
const NODE_LISTENERS: [event: string, name: string][] = [
  ['data', 'bound socketOnData'],
  ['end', 'bound socketOnEnd'],
  ['close', 'bound socketOnClose'],
  ['drain', 'bound socketOnDrain'],
  ['error', 'socketOnError'],
  ['timeout', 'socketOnTimeout'],
  ['resume', 'onSocketResume'],
  ['pause', 'onSocketPause'],
];

/**
 * Sends the stream's head through the response, then takes the socket from node:http as its
 * upgrade path does for a WebSocket: node's listeners off the socket, the response detached,
 * the HTTP parser freed. The stream then writes its chunks to the socket itself, and the
 * request, the response and the parser are garbage instead of living as long as the stream:
 * about 11 KB of RSS a connection, 7 KB of it the parser's (bench/README.md, W2).
 *
 * Only for HTTP/1.x on a socket that node:http serves this response on (not a pipelined
 * request waiting its turn); undefined otherwise, and then the response serves the stream.
 * The head says `Connection: close`: the connection ends with the stream.
 */
function takeOver(req: IncomingMessage, res: ServerResponse, headers: Record<string, string>): SocketSink | undefined {
  const socket = res.socket as HttpSocket | null;
  if (freeParser === undefined || req.httpVersionMajor !== 1 || socket === null || socket._httpMessage !== res || !socket.parser || !socket.writable) return undefined;
  const own: [string, (...args: unknown[]) => void][] = [];
  for (const [event, name] of NODE_LISTENERS) {
    const listener = socket.listeners(event).find((l) => l.name === name);
    // Another node:http than this code knows: leave it the stream.
    if (listener === undefined) return undefined;
    own.push([event, listener as (...args: unknown[]) => void]);
  }
  // node:http's own listener: what it does when a response finishes no longer applies.
  const onFinish = res.listeners('finish').find((l) => l.name === 'bound resOnFinish') as ((...args: unknown[]) => void) | undefined;
  if (onFinish === undefined) return undefined;
  res.removeListener('finish', onFinish);
  // Someone else listens to the response (a request logger, say): it keeps the socket, to hear
  // the end from node:http itself ('finish' when the stream ends cleanly, 'close' in any case).
  const watched = res.listenerCount('close') > 0 || res.listenerCount('finish') > 0;
  // The head and the stream's first bytes (its config event, written in this same tick) leave
  // in one write: W4 churn profiles showed the head's own write at ~7% of the CPU.
  socket.cork();
  process.nextTick(uncork, socket);
  res.writeHead(200, { ...headers, connection: 'close' });
  // The head goes to the socket now: the response holds it.
  res.flushHeaders();
  if (!watched) res.detachSocket(socket);
  for (const [event, listener] of own) socket.removeListener(event, listener);
  const parser = socket.parser;
  parser.finish();
  freeParser(parser, req, socket);
  // Reads now come to the socket rather than the parser.
  ownSocket(socket, socket.server);
  return new SocketSink(socket, res.chunkedEncoding, watched ? res : undefined);
}

function header(req: IncomingMessage, name: string): string | undefined {
  const value = req.headers[name];
  return Array.isArray(value) ? value[0] : value;
}

/**
 * Reads the request body up to `limit` bytes. A body that a framework already parsed
 * (Express's json() or urlencoded(), say) is taken as it is.
 */
async function readBody(req: IncomingMessage, limit: number): Promise<Buffer | unknown> {
  const parsed = (req as { body?: unknown }).body;
  // Only a body whose stream was consumed was parsed for this request (Express 4 sets {} on skipped ones).
  if (parsed !== undefined && req.readableEnded) {
    if (typeof parsed === 'string') return Buffer.from(parsed);
    if (isForm(req) && typeof parsed === 'object' && parsed !== null && !Buffer.isBuffer(parsed)) {
      return Buffer.from(new URLSearchParams(parsed as Record<string, string>).toString());
    }
    return parsed;
  }
  const declared = Number(header(req, 'content-length'));
  if (Number.isFinite(declared) && declared > limit) throw tooLarge(limit);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) throw tooLarge(limit);
    chunks.push(chunk);
  }
  return Buffer.concat(chunks, size);
}

function isForm(req: IncomingMessage): boolean {
  return (header(req, 'content-type') ?? '').toLowerCase().startsWith('application/x-www-form-urlencoded');
}

function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string>): void {
  if (res.headersSent) return;
  res.writeHead(status, { 'content-type': JSON_TYPE, ...headers }).end(JSON.stringify(body));
}

function sendError(res: ServerResponse, error: RelayError, headers: Record<string, string>): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  // A body we did not read (too large) is not worth draining: close the connection after answering.
  // (HTTP/2 has no Connection header: node drops it with a warning.)
  const extra: Record<string, string> = error.code === 'too-large' ? (res.req?.httpVersionMajor === 2 ? {} : { connection: 'close' }) : retryAfterHeaders(error);
  sendJson(res, error.status, error.toJSON(), { ...headers, ...extra });
}
