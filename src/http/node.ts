import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Registry } from 'prom-client';
import { credentialsFrom } from '../auth.ts';
import { RelayError, toRelayError } from '../errors.ts';
import { retryAfterHeaders } from '../limits.ts';
import type { RelayCore } from '../relay.ts';
import { SseConnection, type ByteSink } from '../sse.ts';
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
  const credentials = (req: IncomingMessage, url: URL, cookie: boolean) => credentialsFrom((name) => header(req, name), url, cookie);
  const clientAddress = (req: IncomingMessage) => core.limits.clientAddress(req.socket.remoteAddress, req.headers['x-forwarded-for']);

  const events: NodeHandler = async (req, res) => {
    const url = new URL(req.url ?? '/', 'http://relay');
    const lastEventId = header(req, 'last-event-id') ?? url.searchParams.get('last_event_id');
    try {
      await core.openStream(
        { topics: url.searchParams.get('topics'), sessionId: url.searchParams.get('session_id'), lastEventId, clientAddress: clientAddress(req), credentials: credentials(req, url, true) },
        (session) => {
          res.writeHead(200, { ...SSE_HEADERS, ...cors(req) });
          req.socket.setNoDelay(true);
          req.socket.setKeepAlive(true);
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

const CRLF = Buffer.from('\r\n');
/** Largest batch framed by copying; above it the per-subscriber copy would cost more than the writes it saves. */
const COPY_LIMIT = 16 * 1024;

function byteLength(chunks: Buffer[]): number {
  let size = 0;
  for (const chunk of chunks) size += chunk.length;
  return size;
}

/** The chunks (`size` bytes in all) as one HTTP/1.1 chunk (RFC 9112 7.1): size in hex, CRLF, data, CRLF. */
function chunkOf(chunks: Buffer[], size: number): Buffer {
  const head = `${size.toString(16)}\r\n`;
  const out = Buffer.allocUnsafe(head.length + size + 2);
  let at = out.write(head, 0, 'latin1');
  for (const chunk of chunks) at += chunk.copy(out, at);
  CRLF.copy(out, at);
  return out;
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
