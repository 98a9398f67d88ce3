import { STATUS_CODES, type IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { WebSocketServer, type RawData, type WebSocket } from 'ws';
import { credentialsFrom, type Credentials, type Principal } from './auth.ts';
import { QueuedConnection, eventsLostError, type ConfigPayload, type ConnectionStats, type OutboxLimits } from './connection.ts';
import { RelayError, toRelayError } from './errors.ts';
import { CONFIG_TOPIC, type RelayMessage } from './frames.ts';
import type { CorsOptions } from './options.ts';
import type { RelayCore } from './relay.ts';
import { assertTopicArray } from './topics.ts';

/**
 * WebSocket transport of PROTOCOL.md section 5: the sessions, ids and JSON envelopes of SSE,
 * one JSON object per text frame, plus subscribe / unsubscribe frames from the client.
 */

/** Close codes (RFC 6455 section 7.4.1) and when the relay uses them. */
export const CLOSE_CODES = {
  /** Another connection took over the session. */
  normal: 1000,
  /** The relay is shutting down: reconnect, to another instance if need be. */
  goingAway: 1001,
  /** The request was refused (invalid topic, too many topics, …): the error frame before it says why; retrying as is fails again. */
  policy: 1008,
  /** A client frame was larger than the limit (sent by the ws library). */
  tooBig: 1009,
  /** A limit refused the stream (`rate-limited`: the relay is full, or too many streams from this address): retry later, with backoff. */
  tryAgainLater: 1013,
  /** The relay failed unexpectedly while opening the stream: retry later. */
  internal: 1011,
} as const;

/** How long a closing handshake may take before the socket is cut. */
const CLOSE_GRACE_MS = 2_000;
/** Client frames being processed at once before the relay stops reading more from that client. */
const MAX_PENDING_FRAMES = 16;
/**
 * Messages from this size on leave as two fragments (no per-subscriber copy); smaller ones as one
 * concatenated frame. Measured with 100–500 local ws clients: at 200 B the copy costs ~10% less
 * server CPU than a second frame, at 4 KiB both cost the same, at 32–128 KiB fragments cost 2.5–3× less.
 */
const FRAGMENT_ABOVE = 4096;

const FRAGMENT = { binary: false, fin: false } as const;
const LAST_FRAGMENT = { binary: false, fin: true } as const;
const TEXT = { binary: false, fin: true } as const;

// `<seq>",` + the envelope without its `{`: shared by every WebSocket subscriber of a message.
const tails = new WeakMap<RelayMessage, Buffer>();

function wsTail(message: RelayMessage): Buffer {
  let tail = tails.get(message);
  if (tail === undefined) {
    const envelope = message.envelope();
    tail = Buffer.concat([Buffer.from(`${message.idSuffix}",`), envelope.subarray(1)]);
    tails.set(message, tail);
  }
  return tail;
}

/**
 * One WebSocket client. A message is the session's `{"id":"<session>.` then the message's shared
 * tail: sent as two fragments of one text message when large, so no subscriber copies it.
 */
export class WsConnection extends QueuedConnection {
  readonly transport = 'ws';
  private readonly ws: WebSocket;
  private readonly socket: Duplex;
  private readonly idPrefix: Buffer;
  private readonly shuttingDown: () => boolean;
  private awaitingPong = false;

  constructor(ws: WebSocket, socket: Duplex, sessionId: string, limits: OutboxLimits, stats: ConnectionStats, shuttingDown: () => boolean) {
    super(limits, stats);
    this.ws = ws;
    this.socket = socket;
    this.shuttingDown = shuttingDown;
    // `{"id":"<session>.` — the JSON string of the id, without its closing quote.
    this.idPrefix = Buffer.from(`{"id":${JSON.stringify(`${sessionId}.`).slice(0, -1)}`);
    socket.on('drain', () => this.drained());
    ws.on('pong', () => {
      this.awaitingPong = false;
    });
    ws.once('close', () => this.gone());
    if (ws.readyState !== ws.OPEN) this.gone();
  }

  open(config: ConfigPayload, id: string, _retryMs: number): void {
    this.sendJson({ id, topic: CONFIG_TOPIC, payload: config });
  }

  /** Sends a frame outside the outbox: answers to the client's own frames. */
  sendJson(value: unknown): void {
    if (!this.closed && this.ws.readyState === this.ws.OPEN) this.ws.send(JSON.stringify(value), TEXT);
  }

  /** True while the socket holds more than it should: the client is not reading. */
  get saturated(): boolean {
    return this.socket.writableNeedDrain;
  }

  /**
   * Called every heartbeat interval: a client that did not answer the previous ping is cut off
   * (it resumes when it comes back); the ping also keeps proxies from closing a quiet connection.
   */
  ping(): void {
    if (this.closed) return;
    if (this.awaitingPong) {
      this.close(true);
      return;
    }
    this.awaitingPong = true;
    this.ws.ping();
  }

  // Keep-alive is the ping above, sent to every connection whether quiet or not.
  protected heartbeat(): boolean {
    return true; // pings keep WebSockets alive (see the relay-wide ping timer)
  }

  protected writeBatch(items: (RelayMessage | RelayError)[], lost: number): boolean {
    const ws = this.ws;
    if (ws.readyState !== ws.OPEN) return false; // closing: `close` follows
    // One write for the whole batch: ws writes each frame separately.
    this.socket.cork();
    if (lost > 0) ws.send(JSON.stringify(eventsLostError(lost).toJSON()), TEXT);
    for (const item of items) {
      if (item instanceof RelayError) {
        ws.send(JSON.stringify(item.toJSON()), TEXT);
      } else {
        const tail = wsTail(item);
        if (tail.length < FRAGMENT_ABOVE) {
          ws.send(Buffer.concat([this.idPrefix, tail]), TEXT);
        } else {
          ws.send(this.idPrefix, FRAGMENT);
          ws.send(tail, LAST_FRAGMENT);
        }
      }
    }
    this.socket.uncork();
    // The socket says `drain` once it has written what it holds; `drained` is wired to it.
    return !this.socket.writableNeedDrain;
  }

  protected end(abort: boolean): void {
    if (abort) {
      // A reader this far behind would not read a close frame either.
      this.ws.terminate();
      return;
    }
    const shutdown = this.shuttingDown();
    closeSoon(this.ws, shutdown ? CLOSE_CODES.goingAway : CLOSE_CODES.normal, shutdown ? 'relay shutting down' : 'another connection took over this session');
  }
}

/** Starts the closing handshake, and cuts the socket if the client does not complete it soon. */
function closeSoon(ws: WebSocket, code: number, reason: string): void {
  ws.close(code, reason);
  const timer = setTimeout(() => ws.terminate(), CLOSE_GRACE_MS);
  timer.unref();
  ws.once('close', () => clearTimeout(timer));
}

/** `relay.handleUpgrade`: takes the upgrade when the path is the relay's WebSocket path. */
export type UpgradeHandler = (req: IncomingMessage, socket: Duplex, head: Buffer) => boolean;

/** The WebSocket endpoint of a relay: upgrades, client frames, and one ping timer for all its connections. */
export function createWsTransport(core: RelayCore): { handleUpgrade: UpgradeHandler } {
  const wss = new WebSocketServer({ noServer: true, clientTracking: false, perMessageDeflate: false, maxPayload: core.options.maxBodyBytes });
  const open = new Set<WsConnection>();
  let pinger: NodeJS.Timeout | undefined;

  const track = (connection: WsConnection, ws: WebSocket) => {
    open.add(connection);
    ws.once('close', () => {
      open.delete(connection);
      if (open.size === 0) {
        clearInterval(pinger);
        pinger = undefined;
      }
    });
    pinger ??= setInterval(() => {
      for (const c of open) c.ping();
    }, core.options.heartbeatMs);
    pinger.unref();
  };

  const serve = (ws: WebSocket, socket: Duplex, url: URL, clientAddress: string | undefined, credentials: Credentials) => {
    ws.on('error', () => {}); // a broken socket also emits `close`, which is what matters
    let connection: WsConnection | undefined;
    let sessionId = '';
    // Who opened the stream: the client's subscribe frames are checked against its grants.
    let principal: Principal | undefined;
    const opened = core
      .openStream(
        { topics: url.searchParams.get('topics'), sessionId: url.searchParams.get('session_id'), lastEventId: url.searchParams.get('last_event_id'), clientAddress, credentials },
        (session, bearer) => {
          sessionId = session.id;
          principal = bearer;
          connection = new WsConnection(ws, socket, session.id, core.options.outbox, core.deliveries, () => core.isClosing);
          if (!connection.isClosed) track(connection, ws);
          return connection;
        },
      )
      .catch((err: unknown) => {
        // Said in a frame before closing: a browser cannot read the status of a refused upgrade.
        const error = toRelayError(err);
        if (ws.readyState !== ws.OPEN) return;
        ws.send(JSON.stringify(error.toJSON()), TEXT);
        const code = core.isClosing ? CLOSE_CODES.goingAway : error.code === 'rate-limited' ? CLOSE_CODES.tryAgainLater : error.status < 500 ? CLOSE_CODES.policy : CLOSE_CODES.internal;
        closeSoon(ws, code, error.code);
      });

    // Frames are answered one after the other, in order, after the stream is open.
    let chain: Promise<unknown> = opened;
    let pending = 0;
    ws.on('message', (data) => {
      if (++pending >= MAX_PENDING_FRAMES) ws.pause();
      chain = chain.then(async () => {
        const c = connection;
        if (c !== undefined && !c.isClosed) {
          c.sendJson(await answer(core, sessionId, principal, data));
          // A client that sends requests but does not read the answers is not read from either.
          if (c.saturated) {
            await new Promise<void>((resolve) => {
              const done = () => {
                socket.off('drain', done);
                ws.off('close', done);
                resolve();
              };
              socket.on('drain', done);
              ws.on('close', done);
            });
          }
        }
        if (--pending < MAX_PENDING_FRAMES) ws.resume();
      });
    });
  };

  const handleUpgrade: UpgradeHandler = (req, socket, head) => {
    const url = new URL(req.url ?? '/', 'http://relay');
    if (url.pathname !== core.options.paths.ws) return false;
    if (!originAllowed(req.headers.origin, req.headers.host, core.options.cors)) {
      refuse(socket, new RelayError('forbidden', `WebSocket connections from origin ${req.headers.origin} are not allowed (see the cors option)`));
      return true;
    }
    const clientAddress = core.limits.streamAddress(req.socket, req.headers['x-forwarded-for']);
    // The cookie counts: originAllowed above keeps other sites' pages from using a visitor's cookie.
    const credentials = credentialsFrom((name) => req.headers[name] as string | undefined, url.searchParams, true);
    wss.handleUpgrade(req, socket, head, (ws) => serve(ws, socket, url, clientAddress, credentials));
    return true;
  };

  return { handleUpgrade };
}

/** Answers one client frame: the session's subscriptions after the change, or an error. Echoes the frame's `ref`. */
async function answer(core: RelayCore, sessionId: string, principal: Principal | undefined, data: RawData): Promise<Record<string, unknown>> {
  let ref: unknown;
  try {
    const value = parseObject(data);
    // Known before the rest is checked, so that an error answers the frame that caused it.
    if (typeof value.ref === 'string' || typeof value.ref === 'number') ref = value.ref;
    const frame = checkFrame(value);
    const result = await core.updateSubscriptions({
      sessionId,
      add: frame.type === 'subscribe' ? frame.topics : [],
      remove: frame.type === 'unsubscribe' ? frame.topics : [],
    }, principal);
    return withRef({ type: 'subscriptions', subscriptions: result.subscriptions, failed: result.failed }, ref);
  } catch (err) {
    return withRef(toRelayError(err).toJSON(), ref);
  }
}

function withRef(body: Record<string, unknown>, ref: unknown): Record<string, unknown> {
  return ref === undefined ? body : { ...body, ref };
}

interface ClientFrame {
  type: 'subscribe' | 'unsubscribe';
  topics: string[];
}

const USAGE = 'a frame must be a JSON object like {"type":"subscribe","topics":["a"]} or {"type":"unsubscribe","topics":["a"]}';

function parseObject(data: RawData): Record<string, unknown> {
  const text = (Array.isArray(data) ? Buffer.concat(data) : Buffer.isBuffer(data) ? data : Buffer.from(data)).toString('utf8');
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new RelayError('bad-request', `malformed JSON: ${(err as Error).message}`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new RelayError('bad-request', USAGE);
  return value as Record<string, unknown>;
}

function checkFrame(frame: Record<string, unknown>): ClientFrame {
  if (frame.type !== 'subscribe' && frame.type !== 'unsubscribe') {
    throw new RelayError('bad-request', `unknown frame type ${JSON.stringify(frame.type)}: ${USAGE}`);
  }
  if (!Array.isArray(frame.topics)) throw new RelayError('bad-request', USAGE);
  return { type: frame.type, topics: assertTopicArray(frame.topics, 'topics') };
}

/**
 * Browsers send any page's cookies with a WebSocket handshake and apply no CORS to it, so the
 * cors option decides which pages may connect: the same origin always, others when listed.
 */
function originAllowed(origin: string | undefined, host: string | undefined, cors: CorsOptions | false): boolean {
  if (origin === undefined) return true; // not a browser
  if (cors !== false && (cors.origins === '*' || cors.origins.includes(origin))) return true;
  try {
    return new URL(origin).host === host;
  } catch {
    return false;
  }
}

/** Answers an upgrade request with an HTTP error, as the relay's other endpoints would. */
function refuse(socket: Duplex, error: RelayError): void {
  socket.on('error', () => {}); // node:http no longer listens, and the client may be gone already
  const body = JSON.stringify(error.toJSON());
  socket.end(
    `HTTP/1.1 ${error.status} ${STATUS_CODES[error.status]}\r\nConnection: close\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
  );
}
