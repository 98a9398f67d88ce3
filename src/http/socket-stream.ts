import type { ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import type { RelayCore } from '../relay.ts';
import type { Session } from '../session.ts';
import { SseConnection, type ByteSink } from '../sse.ts';

/**
 * An SSE stream that owns its TCP socket: no node:http request, response or parser lives as
 * long as the stream (bench/README.md, W2 and W4). Shared by the node:http takeover (node.ts)
 * and the streams served before node:http (fast-streams.ts).
 */

/** What closeAllConnections() is on: a node:http server. */
interface ConnectionsOwner {
  closeAllConnections?: () => void;
}

/**
 * Makes the socket the stream's: a client that ends its side ends the connection (as node:http
 * did), errors end in 'close', the server's closeAllConnections() reaches it, and reads go on
 * (dropped) so that a FIN is seen.
 */
export function ownSocket(socket: Socket, server: ConnectionsOwner | null | undefined): void {
  socket.on('end', endSocket);
  socket.on('error', ignore);
  if (server != null) track(socket, server);
  socket.resume();
}

/** The SSE connection of a session on its own socket, chunked (HTTP/1.1) or not (HTTP/1.0). */
export function socketStream(core: RelayCore, session: Session, sink: SocketSink): SseConnection {
  const connection = new SseConnection(sink, session.idPrefix, core.options.outbox, core.deliveries);
  const { drained, gone } = connection.events;
  sink.socket.on('drain', drained);
  // on, not once: a socket closes once, and once() costs a wrapper and its state per connection.
  sink.socket.on('close', gone);
  if (sink.socket.destroyed) gone();
  return connection;
}

export function uncork(socket: Socket): void {
  socket.uncork();
}

function endSocket(this: Socket): void {
  this.end();
}

export function ignore(): void {}

/**
 * Taken-over sockets by server. node:http's closeAllConnections() knows a connection by its
 * parser, which these no longer have: each server's closeAllConnections is wrapped to destroy
 * them too (tests and shutdown deadlines rely on it). closeIdleConnections() left a streaming
 * response alone, and does so still.
 */
const takenOver = new WeakMap<object, Set<Socket>>();

function track(socket: Socket, server: ConnectionsOwner): void {
  let sockets = takenOver.get(server);
  if (sockets === undefined) {
    const set = (sockets = new Set());
    takenOver.set(server, set);
    const closeAll = server.closeAllConnections;
    if (typeof closeAll === 'function') {
      server.closeAllConnections = function closeAllConnections(this: unknown) {
        closeAll.call(this);
        for (const socket of set) socket.destroy();
      };
    }
  }
  sockets.add(socket);
  // Kept on the socket: one passed from another process has no `server` to find its set by, and a closure per stream would cost more.
  (socket as TrackedSocket)[TRACKED_IN] = sockets;
  socket.on('close', untrack);
}

const TRACKED_IN = Symbol('livepipe.trackedIn');
interface TrackedSocket extends Socket {
  [TRACKED_IN]?: Set<Socket>;
}

function untrack(this: TrackedSocket): void {
  this[TRACKED_IN]?.delete(this);
}

/**
 * A stream on a socket of its own (taken from node:http by node.ts, or served before it by fast-streams.ts): each batch is framed as one
 * HTTP/1.1 chunk (RFC 9112 7.1), or sent as is to an HTTP/1.0 client (the connection's end
 * ends the body), in one socket write. Saturation and 'drain' are the socket's.
 */
export class SocketSink implements ByteSink {
  readonly socket: Socket;
  private readonly chunked: boolean;
  /** The response, still on the socket, when someone else listens to it: it ends the stream. */
  private readonly response: ServerResponse | undefined;

  /** False on TLS, whose socket may hold the clear text after write() returns. */
  private readonly framesInSlab: boolean;

  constructor(socket: Socket, chunked: boolean, response: ServerResponse | undefined) {
    this.socket = socket;
    this.chunked = chunked;
    this.response = response;
    this.framesInSlab = (socket as { encrypted?: boolean }).encrypted !== true;
  }

  write(chunks: Buffer[]): boolean {
    const socket = this.socket;
    // Gone or ending: 'close' follows.
    if (socket.destroyed || socket.writableEnded) return false;
    const size = byteLength(chunks);
    // Copying is cheap only for small batches: a large body goes out uncopied, in one writev.
    if (size <= COPY_LIMIT) {
      if (!this.chunked) return socket.write(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, size));
      return this.send(chunkOf(chunks, size, this.frameBuffer(chunkBytes(size))));
    }
    socket.cork();
    if (this.chunked) socket.write(`${size.toString(16)}\r\n`, 'latin1');
    let ok = true;
    for (const chunk of chunks) ok = socket.write(chunk);
    if (this.chunked) ok = socket.write(CRLF);
    socket.uncork();
    return ok;
  }

  writeEvent(prefix: Buffer, tail: Buffer): boolean {
    const socket = this.socket;
    if (socket.destroyed || socket.writableEnded) return false;
    const size = prefix.length + tail.length;
    if (!this.chunked || size > COPY_LIMIT) return this.write([prefix, tail]);
    const out = this.frameBuffer(chunkBytes(size));
    let at = chunkHead(out, size);
    out.set(prefix, at);
    out.set(tail, (at += prefix.length));
    at += tail.length;
    out[at] = CR;
    out[at + 1] = LF;
    return this.send(out);
  }

  /**
   * Where a batch is framed: the shared slab when nothing waits on this socket (the kernel
   * then takes the bytes before write() returns, and the slab is free for the next socket),
   * else a buffer of its own. Framing every delivery in a fresh pooled Buffer cost ~18 MB/s of
   * ArrayBuffers at 100k deliveries/s, and the full GCs that external memory triggers.
   */
  private frameBuffer(bytes: number): Buffer {
    return this.framesInSlab && bytes <= SLAB_BYTES && this.socket.writableLength === 0 ? slab.subarray(0, bytes) : Buffer.allocUnsafe(bytes);
  }

  private send(out: Buffer): boolean {
    const ok = this.socket.write(out);
    // Not all taken at once (a full socket, a cork): the pending write keeps the slab, and the next batch gets a new one.
    if (out.buffer === slab.buffer && this.socket.writableLength !== 0) slab = Buffer.allocUnsafeSlow(SLAB_BYTES);
    return ok;
  }

  end(): void {
    const socket = this.socket;
    if (socket.destroyed || socket.writableEnded) return;
    // The last chunk, then the connection (the head said Connection: close), once it is all sent.
    const close = () => socket.destroy();
    // Its end() sends the last chunk (it kept count of nothing else: the chunks went around it).
    if (this.response !== undefined) this.response.end(close);
    else if (this.chunked) socket.end(LAST_CHUNK, close);
    else socket.end(close);
  }

  destroy(): void {
    this.socket.destroy();
  }
}

const CRLF = Buffer.from('\r\n');
const LAST_CHUNK = Buffer.from('0\r\n\r\n');
/** Largest batch framed by copying; above it the per-subscriber copy would cost more than the writes it saves. */
export const COPY_LIMIT = 16 * 1024;

export function byteLength(chunks: Buffer[]): number {
  let size = 0;
  for (const chunk of chunks) size += chunk.length;
  return size;
}

/** The chunks (`size` bytes in all) as one HTTP/1.1 chunk (RFC 9112 7.1): size in hex, CRLF, data, CRLF. */
export function chunkOf(chunks: Buffer[], size: number, out: Buffer = Buffer.allocUnsafe(chunkBytes(size))): Buffer {
  let at = chunkHead(out, size);
  // TypedArray#set, not Buffer#copy: for ~100-byte pieces its argument checks cost more than the copy.
  for (const chunk of chunks) {
    out.set(chunk, at);
    at += chunk.length;
  }
  out[at] = CR;
  out[at + 1] = LF;
  return out;
}

const CR = 13;
const LF = 10;
const HEX = Buffer.from('0123456789abcdef', 'latin1');

const SLAB_BYTES = 8 * 1024;
let slab = Buffer.allocUnsafeSlow(SLAB_BYTES);

function hexDigits(size: number): number {
  let digits = 1;
  while (size >= 16 ** digits) digits++;
  return digits;
}

/** The bytes of an HTTP/1.1 chunk of `size` bytes of data: size line, data, CRLF. */
function chunkBytes(size: number): number {
  return hexDigits(size) + size + 4;
}

/** Writes a chunk's size line (hex digits, CRLF) at the start of `out` (chunkBytes(size) long), without making a string; returns where the data goes. */
function chunkHead(out: Buffer, size: number): number {
  const digits = out.length - size - 4;
  for (let i = digits - 1, n = size; i >= 0; i--, n = Math.floor(n / 16)) out[i] = HEX[n % 16]!;
  out[digits] = CR;
  out[digits + 1] = LF;
  return digits + 2;
}
