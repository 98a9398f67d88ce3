/**
 * An SSE client over node:http, node:https or one node:http2 session, for the cluster and TLS
 * tests: it sees the response headers (which worker answered) and can use a given agent (to
 * send a request on a connection already known to be on one worker).
 */
import { request as httpRequest, type Agent, type IncomingHttpHeaders } from 'node:http';
import type { ClientHttp2Session } from 'node:http2';
import { request as httpsRequest } from 'node:https';
import type { Readable } from 'node:stream';
import { Waiter } from './wait.ts';

export interface SseEvent {
  id: string | undefined;
  json: any;
}

export class SseStream {
  readonly events: SseEvent[] = [];
  ended = false;
  /** For node:http(s): whether the request went on a connection that had served an earlier one. */
  reusedSocket = false;
  private buffer = '';
  private readonly waiter = new Waiter();

  readonly status: number;
  readonly headers: IncomingHttpHeaders;
  private readonly cancel: () => void;
  private readonly source: Readable;

  constructor(status: number, headers: IncomingHttpHeaders, source: Readable, cancel: () => void) {
    this.status = status;
    this.headers = headers;
    this.cancel = cancel;
    this.source = source;
    source.setEncoding('utf8');
    source.on('data', (chunk: string) => this.feed(chunk));
    const end = () => {
      this.ended = true;
      this.waiter.wake();
    };
    source.on('end', end).on('error', end).on('close', end);
  }

  /** The config event's payload. */
  get config(): any {
    return this.events[0]?.json?.payload;
  }

  /** The message events' JSON (not config, not errors). */
  messages(): any[] {
    return this.events.map((e) => e.json).filter((j) => j?.topic !== undefined && j.topic !== '/httpsub/config');
  }

  errors(): any[] {
    return this.events.map((e) => e.json?.error).filter((e) => e !== undefined);
  }

  /** The id of the last event that had one (what EventSource sends back as Last-Event-ID). */
  get lastId(): string | undefined {
    return this.events.findLast((e) => e.id !== undefined)?.id;
  }

  async until(predicate: () => boolean, what: string, ms = 5_000): Promise<void> {
    await this.waiter.until(predicate, ms, () => new Error(`timed out waiting for ${what}; events: ${JSON.stringify(this.events.map((e) => e.json))}`));
  }

  close(): void {
    this.cancel();
  }

  /** Stops reading, as a client that cannot keep up would (its flow-control window fills). */
  pause(): void {
    this.source.pause();
  }

  resume(): void {
    this.source.resume();
  }

  private feed(chunk: string): void {
    this.buffer += chunk;
    let end: number;
    while ((end = this.buffer.indexOf('\n\n')) >= 0) {
      const block = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      let id: string | undefined;
      const data: string[] = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('id: ')) id = line.slice(4);
        else if (line.startsWith('data: ')) data.push(line.slice(6));
      }
      if (data.length > 0) this.events.push({ id, json: JSON.parse(data.join('\n')) });
    }
    this.waiter.wake();
  }
}

/** GET an SSE stream over node:http or node:https (by the URL's scheme). */
export function openSse(url: string, options: { agent?: Agent | false; headers?: Record<string, string>; ca?: Buffer } = {}): Promise<SseStream> {
  const send = url.startsWith('https:') ? httpsRequest : httpRequest;
  return new Promise((resolve, reject) => {
    const req = send(url, { agent: options.agent, ca: options.ca, headers: { accept: 'text/event-stream', ...options.headers } }, (res) => {
      const stream = new SseStream(res.statusCode ?? 0, res.headers, res, () => req.destroy());
      stream.reusedSocket = req.reusedSocket;
      resolve(stream);
    });
    req.on('error', reject);
    req.end();
  });
}

/** GET an SSE stream as one more stream of an HTTP/2 session. */
export function openSseH2(session: ClientHttp2Session, path: string, headers: Record<string, string> = {}): Promise<SseStream> {
  return new Promise((resolve, reject) => {
    const stream = session.request({ ':path': path, accept: 'text/event-stream', ...headers });
    stream.once('response', (h) => {
      const { ':status': status, ...rest } = h;
      resolve(new SseStream(Number(status), rest as IncomingHttpHeaders, stream, () => stream.close()));
    });
    stream.once('error', reject);
  });
}
