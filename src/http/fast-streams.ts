import { STATUS_CODES, Server } from 'node:http';
import type { Socket } from 'node:net';
import { toRelayError, type RelayError } from '../errors.ts';
import { credentialsFrom } from '../auth.ts';
import { retryAfterHeaders } from '../limits.ts';
import type { RelayCore } from '../relay.ts';
import { SSE_HEADERS, JSON_TYPE, corsHeaders } from './shared.ts';
import { SocketSink, ignore, ownSocket, socketStream, uncork } from './socket-stream.ts';
import { readStreamHead, type StreamHead } from './stream-head.ts';

/**
 * SSE streams served straight off the TCP socket, before node:http sees the connection.
 *
 * A bare node:http server opens and closes about half as many connections a second on one core
 * as a bare `net` server doing the same work (bench/README.md, W4): the per-connection parser,
 * request, response, head and close handling. So the first bytes of each new connection are
 * read here: a plain `GET <events path>` (stream-head.ts) is answered here, on the socket, with
 * the same head and chunked body as the node:http path; anything else, byte for byte as it came,
 * goes to node:http as if the client had just connected (the documented way to hand it a
 * socket: its 'connection' event), so every other request, upgrade and error is node:http's.
 */

export interface FastStreamOptions {
  /** Headers every answer carries (a cluster worker names itself in one). */
  headers?: Record<string, string>;
  /** True leaves the request to node:http (a cluster worker routes other workers' sessions that way). */
  decline?: (head: StreamHead) => boolean;
}

type ConnectionListener = (this: Server, socket: Socket) => void;

/**
 * Serves the relay's SSE streams on `server` (a plain-HTTP node:http server) before node:http
 * does. Returns false, changing nothing, on a server whose connection handling is not node's
 * own (HTTPS, say, whose bytes are TLS, or another HTTP implementation).
 */
export function serveStreamsFast(server: Server, core: RelayCore, options: FastStreamOptions = {}): boolean {
  // node:http's own listener (lib/_http_server.js); other 'connection' listeners stay and hear every connection.
  const nodeHttp = server.listeners('connection').find((l) => l.name === 'connectionListener') as ConnectionListener | undefined;
  // node:https and node:http2 servers are not node:http's Server (their bytes are TLS or HTTP/2).
  if (!(server instanceof Server) || nodeHttp === undefined) return false;
  const waiting = new Map<Socket, number>();
  const giveTo = (socket: Socket, data: Buffer) => {
    socket.removeListener('error', ignore);
    socket.unshift(data);
    nodeHttp.call(server, socket);
  };
  server.removeListener('connection', nodeHttp);
  server.on('connection', (socket: Socket) => {
    // A reset before the first bytes must not be an unhandled 'error'.
    socket.on('error', ignore);
    waiting.set(socket, Date.now());
    socket.once('data', (data: Buffer) => {
      waiting.delete(socket);
      const head = readStreamHead(data, core.options.paths.events);
      if (head === undefined || options.decline?.(head) === true) giveTo(socket, data);
      else serve(core, server, socket, head, options.headers);
    });
  });
  // A connection that sends nothing is cut after node:http's headersTimeout, as node:http cuts
  // one that never finishes its head; one that ended its side without a byte, or that a closing
  // server holds (node:http closes its idle connections on close()), at the next sweep.
  const sweep = setInterval(() => {
    const since = Date.now() - server.headersTimeout;
    for (const [socket, at] of waiting) {
      if (socket.destroyed) waiting.delete(socket);
      else if (at <= since || socket.readableEnded || !server.listening) socket.destroy();
    }
  }, 1000);
  sweep.unref();
  server.once('close', () => clearInterval(sweep));
  // As node:http's own closeAllConnections() cuts a connection that has not sent a request yet.
  const closeAll = server.closeAllConnections;
  server.closeAllConnections = function closeAllConnections(this: Server) {
    closeAll.call(this);
    for (const socket of waiting.keys()) socket.destroy();
  };
  return true;
}

function serve(core: RelayCore, server: Server, socket: Socket, head: StreamHead, extra: Record<string, string> | undefined): void {
  const query = new URLSearchParams(head.query);
  const headers = head.headers;
  const cors = { ...corsHeaders(headers.origin, core.options.cors, false, core.auth !== undefined), ...extra };
  socket.removeListener('error', ignore);
  ownSocket(socket, server);
  core
    .openStream(
      {
        topics: query.get('topics'),
        sessionId: query.get('session_id'),
        lastEventId: headers['last-event-id'] ?? query.get('last_event_id'),
        clientAddress: core.limits.streamAddress(socket, headers['x-forwarded-for']),
        credentials: credentialsFrom((name) => headers[name], query, true),
      },
      (session) => {
        socket.setNoDelay(true);
        // The head and the config event written in this same tick leave in one write.
        socket.cork();
        process.nextTick(uncork, socket);
        socket.write(responseHead(200, { ...SSE_HEADERS, ...cors, 'transfer-encoding': 'chunked', connection: 'close' }), 'latin1');
        return socketStream(core, session, new SocketSink(socket, true, undefined));
      },
    )
    .catch((err: unknown) => answerError(socket, toRelayError(err), cors));
}

/** An error answer, as node.ts's sendError gives it, and the end of the connection. */
function answerError(socket: Socket, error: RelayError, headers: Record<string, string>): void {
  if (socket.destroyed || socket.writableEnded) return;
  const body = Buffer.from(JSON.stringify(error.toJSON()));
  const head = responseHead(error.status, { 'content-type': JSON_TYPE, ...headers, ...retryAfterHeaders(error), 'content-length': String(body.length), connection: 'close' });
  socket.end(Buffer.concat([Buffer.from(head, 'latin1'), body]));
}

/** An HTTP/1.1 status line and header block; names and values are the relay's own or checked config. */
function responseHead(status: number, headers: Record<string, string>): string {
  let head = `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? ''}\r\n`;
  for (const name in headers) head += `${name}: ${headers[name]}\r\n`;
  return `${head}date: ${httpDate()}\r\n\r\n`;
}

let dateSecond = 0;
let dateText = '';
/** The Date header's value (RFC 9110 6.6.1), made once a second as node:http does. */
function httpDate(): string {
  const now = Date.now();
  const second = Math.floor(now / 1000);
  if (second !== dateSecond) {
    dateSecond = second;
    dateText = new Date(now).toUTCString();
  }
  return dateText;
}
