/** A raw TCP client for wire-level tests: one request as bytes, every byte of the answer kept. */
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import type { RunningRelay } from './relay.ts';
import { Waiter } from './wait.ts';

/** A raw TCP client that sends one request and keeps every byte of the answer. */
export class RawClient {
  text = '';
  ended = false;
  closed = false;
  readonly socket: Socket;
  private readonly waiter = new Waiter();
  private constructor(socket: Socket) {
    this.socket = socket;
    socket.setEncoding('latin1');
    socket.on('data', (chunk: string) => {
      this.text += chunk;
      this.waiter.wake();
    });
    socket.on('end', () => {
      this.ended = true;
      this.waiter.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.waiter.wake();
    });
    socket.on('error', () => {});
  }

  /** Sends `request`; given pieces, each in a write of its own, 50 ms apart (a head split across packets). */
  static async open(r: RunningRelay, request: string | string[]): Promise<RawClient> {
    const { port } = new URL(r.base);
    const socket = connect(Number(port), '127.0.0.1');
    socket.setNoDelay(true);
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    const client = new RawClient(socket);
    const pieces = typeof request === 'string' ? [request] : request;
    for (const [i, piece] of pieces.entries()) {
      if (i > 0) await new Promise((resolve) => setTimeout(resolve, 50));
      socket.write(piece);
    }
    return client;
  }

  get head(): string {
    return this.text.slice(0, this.text.indexOf('\r\n\r\n'));
  }

  get body(): string {
    return this.text.slice(this.text.indexOf('\r\n\r\n') + 4);
  }

  header(name: string): string | undefined {
    const line = this.head.split('\r\n').find((l) => l.toLowerCase().startsWith(`${name}:`));
    return line?.slice(name.length + 1).trim();
  }

  until(predicate: () => boolean, what: string): Promise<void> {
    return this.waiter.until(predicate, 5000, () => new Error(`timed out waiting for ${what}; got:\n${this.text.slice(-1000)}`));
  }
}

/** The payload of a chunked body, and whether it ended with the last chunk (RFC 9112 7.1). */
export function dechunk(body: string): { data: string; complete: boolean } {
  let data = '';
  let at = 0;
  for (;;) {
    const eol = body.indexOf('\r\n', at);
    if (eol < 0) return { data, complete: false };
    const size = parseInt(body.slice(at, eol), 16);
    assert.ok(Number.isInteger(size), `a chunk size line, got ${JSON.stringify(body.slice(at, eol))}`);
    if (size === 0) return { data, complete: body.slice(eol + 2) === '\r\n' };
    data += body.slice(eol + 2, eol + 2 + size);
    assert.equal(body.slice(eol + 2 + size, eol + 4 + size), '\r\n', 'each chunk ends with CRLF');
    at = eol + 4 + size;
  }
}
