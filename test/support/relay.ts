/** Test helpers: a relay on an ephemeral loopback port, and a raw SSE reader that sees every byte. */
import { createServer, request, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { createRelay, type Relay, type RelayOptions } from '../../src/index.ts';
import { Waiter } from './wait.ts';

export interface RunningRelay {
  relay: Relay;
  server: Server;
  /** e.g. http://127.0.0.1:40123 */
  base: string;
  close(): Promise<void>;
}

/** A relay on node:http; `fast` serves its streams before node:http (relay.serveStreamsFast). */
export async function startRelay(options: Partial<RelayOptions> = {}, { fast = false }: { fast?: boolean } = {}): Promise<RunningRelay> {
  const relay = await createRelay({ broker: `mem://test-${process.pid}-${Math.random()}`, ...options });
  const server = createServer((req, res) => void relay.handler(req, res));
  if (fast && !relay.serveStreamsFast(server)) throw new Error('serveStreamsFast refused a plain node:http server');
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    relay,
    server,
    base: `http://127.0.0.1:${port}`,
    async close() {
      await relay.close();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

export interface SseEvent {
  id: string | undefined;
  data: string;
  /** data parsed as JSON */
  json: any;
}

/** A raw SSE client over node:http that parses the stream per the HTML spec and keeps every byte. */
export class SseReader {
  readonly events: SseEvent[] = [];
  readonly comments: string[] = [];
  retry: number | undefined;
  raw = '';
  response!: IncomingMessage;
  ended = false;
  private buffer = '';
  private lastId: string | undefined;
  private readonly waiter = new Waiter();
  private req!: ReturnType<typeof request>;

  static async open(url: string, headers: Record<string, string> = {}): Promise<SseReader> {
    const reader = new SseReader();
    await new Promise<void>((resolve, reject) => {
      reader.req = request(url, { headers: { accept: 'text/event-stream', ...headers } }, (res) => {
        reader.response = res;
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => reader.feed(chunk));
        res.on('end', () => {
          reader.ended = true;
          reader.waiter.wake();
        });
        res.on('error', () => {
          reader.ended = true;
          reader.waiter.wake();
        });
        resolve();
      });
      reader.req.on('error', reject);
      reader.req.end();
    });
    return reader;
  }

  /** The config event's payload (the first event). */
  get config(): any {
    return this.events[0]?.json?.payload;
  }

  /** Message events only (not config, not errors). */
  messages(): SseEvent[] {
    return this.events.filter((e) => e.json?.topic !== undefined && e.json.topic !== '/httpsub/config');
  }

  errors(): any[] {
    return this.events.filter((e) => e.json?.error !== undefined).map((e) => e.json.error);
  }

  until(predicate: () => boolean, ms = 5000, what = 'condition'): Promise<void> {
    return this.waiter.until(predicate, ms, () => new Error(`timed out waiting for ${what}; stream so far:\n${this.raw.slice(-2000)}`));
  }

  close(): void {
    this.req.destroy();
  }

  private feed(chunk: string): void {
    this.raw += chunk;
    this.buffer += chunk;
    let index: number;
    while ((index = this.buffer.search(/\r\n\r\n|\n\n|\r\r/)) >= 0) {
      const block = this.buffer.slice(0, index);
      this.buffer = this.buffer.slice(index + (this.buffer.startsWith('\r\n\r\n', index) ? 4 : 2));
      this.parseBlock(block);
    }
    this.waiter.wake();
  }

  private parseBlock(block: string): void {
    const data: string[] = [];
    let sawId = false;
    for (const line of block.split(/\r\n|\n|\r/)) {
      if (line.startsWith(':')) {
        this.comments.push(line.slice(1));
        continue;
      }
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'data') data.push(value);
      else if (field === 'id') {
        this.lastId = value;
        sawId = true;
      } else if (field === 'retry') this.retry = Number(value);
    }
    if (data.length === 0) return;
    const text = data.join('\n');
    let json: any;
    try {
      json = JSON.parse(text);
    } catch {
      json = undefined;
    }
    this.events.push({ id: sawId ? this.lastId : undefined, data: text, json });
  }
}

/** POSTs and returns status and parsed JSON body (if any). */
export async function post(url: string, body: string | Buffer, headers: Record<string, string> = { 'content-type': 'application/json' }): Promise<{ status: number; body: any; headers: Headers }> {
  const res = await fetch(url, { method: 'POST', body, headers });
  const text = await res.text();
  let parsed: any = text;
  try {
    parsed = text ? JSON.parse(text) : undefined;
  } catch {
    // not JSON
  }
  return { status: res.status, body: parsed, headers: res.headers };
}
