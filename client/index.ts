/**
 * livepipe/client: a dependency-free client for browsers and Node over Server-Sent Events or
 * WebSocket. It resumes after a dropped connection with the last event id (nothing lost, nothing
 * twice), backs off with full jitter, and keeps the wanted topics across sessions. Over SSE it
 * needs only gochan's contract: `GET /events`, `POST /update_subscriptions` and the config event.
 */

export type Transport = 'sse' | 'ws';
export type State = 'connecting' | 'open' | 'reconnecting' | 'closed';

/** A broker message: the JSON envelope of the relay, plus its event id when the server sent one. */
export interface Message {
  topic: string;
  /** The body as a string (or a JSON value when the relay embeds JSON payloads); absent for binary bodies. */
  payload?: unknown;
  /** A body that is not UTF-8, in base64. */
  payload_base64?: string;
  id?: string;
}

/** An error the server reported (`subscription-failure`, `events-lost`, …), or one of the client's own. */
export interface ErrorInfo {
  code: string;
  message: string;
  topic?: string;
  count?: number;
}

export interface StateChange {
  state: State;
  sessionId: string | null;
  /** On `open`: whether the server resumed the previous session. */
  resumed?: boolean;
  /** On `reconnecting` after a failed connection: the wait before the next attempt, and its number (from 1). */
  delayMs?: number;
  attempt?: number;
  /** On a WebSocket close: its code. */
  code?: number;
}

export interface ClientEvents {
  message: Message;
  error: ErrorInfo;
  state: StateChange;
}

export interface ConnectOptions {
  /** Topics to subscribe to from the start. */
  topics?: string[];
  /** `sse` (the default; works with gochan servers too) or `ws`. */
  transport?: Transport;
  /** Endpoint paths, resolved against the URL given to connect. */
  paths?: { events?: string; update?: string; ws?: string };
  /** Reconnect delays: attempt n waits a random time in [0, min(maxMs, initialMs·2ⁿ)). */
  backoff?: { initialMs?: number; maxMs?: number };
  /** The random source of the jitter (default Math.random). */
  random?: () => number;
  /** Defaults to globalThis.EventSource (in Node, pass the `eventsource` package's). */
  EventSource?: new (url: string) => unknown;
  /** Defaults to globalThis.WebSocket. */
  WebSocket?: new (url: string) => unknown;
  /** Defaults to globalThis.fetch. */
  fetch?: (url: string, init: { method: string; headers: Record<string, string>; body: string }) => Promise<{ ok: boolean; status: number; text(): Promise<string> }>;
}

export class ClientError extends Error {
  readonly code: string;
  readonly topic: string | undefined;
  constructor(info: ErrorInfo) {
    super(info.message);
    this.name = 'ClientError';
    this.code = info.code;
    this.topic = info.topic;
  }
}

// The little of EventSource and WebSocket the client uses.
interface Source {
  readyState: number;
  onmessage: ((event: { data: string; lastEventId: string }) => void) | null;
  onerror: (() => void) | null;
  close(): void;
}
interface Socket {
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: (() => void) | null;
  send(data: string): void;
  close(): void;
}
type Connection = { kind: 'sse'; source: Source; topics: string[] } | { kind: 'ws'; socket: Socket; topics: string[] };
type Listener<K extends keyof ClientEvents> = (event: ClientEvents[K]) => void;
interface Waiter {
  resolve(value: never): void;
  reject(error: ClientError): void;
}

const CONFIG_TOPIC = '/httpsub/config';
const SOURCE_CLOSED = 2; // EventSource.CLOSED: it gave up and will not reconnect by itself
const WS_NORMAL = 1000; // another connection took over the session
const WS_POLICY = 1008; // the server refused the request: retrying the same fails again

/** Full jitter: a random wait in [0, min(maxMs, initialMs·2^attempt)). */
export function backoffDelay(attempt: number, initialMs: number, maxMs: number, random: () => number = Math.random): number {
  return Math.floor(random() * Math.min(maxMs, initialMs * 2 ** attempt));
}

/** Opens a client on the relay at `url` (the base that endpoint paths resolve against). */
export function connect(url: string | URL, options: ConnectOptions = {}): Client {
  return new Client(url, options);
}

export class Client {
  state: State = 'connecting';
  sessionId: string | null = null;
  /** The topics the server holds for this session, as it last said. */
  subscriptions: string[] = [];
  private readonly base: URL;
  private readonly options: ConnectOptions;
  private readonly wanted: Set<string>;
  private readonly handlers = new Map<string, Set<(message: Message) => void>>();
  private readonly listeners: { [K in keyof ClientEvents]: Set<Listener<K>> } = { message: new Set(), error: new Set(), state: new Set() };
  private connection: Connection | undefined;
  private lastEventId: string | null = null;
  private attempt = 0;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private waiters: Waiter[] = [];
  private readonly requests = new Map<number, Waiter>();
  private nextRef = 1;
  private chain: Promise<unknown> = Promise.resolve();

  constructor(url: string | URL, options: ConnectOptions) {
    this.base = new URL(url, (globalThis as { location?: { href: string } }).location?.href);
    this.options = options;
    this.wanted = new Set(options.topics);
    this.open();
  }

  /** Listens to `message`, `error` or `state` events; returns the function that stops listening. */
  on<K extends keyof ClientEvents>(type: K, listener: Listener<K>): () => void {
    const set = this.listeners[type] as Set<Listener<K>>;
    set.add(listener);
    return () => set.delete(listener);
  }

  /** Subscribes to topics (once connected); `handler` gets their messages. Resolves with the session's topics. */
  subscribe(topics: string | string[], handler?: (message: Message) => void): Promise<string[]> {
    const list = typeof topics === 'string' ? [topics] : topics;
    for (const topic of list) {
      this.wanted.add(topic);
      if (handler) (this.handlers.get(topic) ?? this.handlers.set(topic, new Set()).get(topic)!).add(handler);
    }
    return this.enqueue(() => this.request(list, [])).catch((err: ClientError) => {
      // A topic the server refused is not wanted any more: it would fail again on every reconnect.
      if (err.code !== 'closed') for (const topic of list) if (!this.subscriptions.includes(topic)) this.forget(topic);
      throw err;
    });
  }

  /** Unsubscribes from topics and drops their handlers. Resolves with the session's topics. */
  unsubscribe(topics: string | string[]): Promise<string[]> {
    const list = typeof topics === 'string' ? [topics] : topics;
    for (const topic of list) this.forget(topic);
    return this.enqueue(() => this.request([], list));
  }

  /** Closes the connection for good. */
  close(): void {
    if (this.state === 'closed') return;
    this.disconnect();
    this.setState({ state: 'closed' });
    const closed = new ClientError({ code: 'closed', message: 'the client was closed' });
    for (const waiter of this.waiters.splice(0)) waiter.reject(closed);
  }

  private forget(topic: string): void {
    this.wanted.delete(topic);
    this.handlers.delete(topic);
  }

  private open(): void {
    const topics = [...this.wanted];
    const paths = this.options.paths ?? {};
    if (this.options.transport === 'ws') {
      const url = this.streamUrl(paths.ws ?? 'ws', topics);
      url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
      const socket = new (this.options.WebSocket ?? required('WebSocket'))(url.href) as Socket;
      const connection: Connection = { kind: 'ws', socket, topics };
      this.connection = connection;
      socket.onmessage = (event) => {
        if (this.connection === connection && typeof event.data === 'string') this.receive(event.data, undefined);
      };
      socket.onerror = () => {}; // `close` follows
      socket.onclose = ({ code, reason }) => {
        if (this.connection !== connection) return;
        if (code === WS_POLICY || code === WS_NORMAL) {
          // 1008: refused, and the error frame before the close said why. 1000: another connection has the session now.
          if (code === WS_NORMAL) this.emit('error', { code: 'taken-over', message: `another connection took over this session${reason ? ` (${reason})` : ''}` });
          this.close();
        } else {
          this.retry(code);
        }
      };
    } else {
      // A first connection sends only `topics=`, as a gochan page would; a resumed one says where it was.
      const source = new (this.options.EventSource ?? required('EventSource'))(this.streamUrl(paths.events ?? 'events', topics).href) as Source;
      const connection: Connection = { kind: 'sse', source, topics };
      this.connection = connection;
      source.onmessage = (event) => {
        if (this.connection === connection) this.receive(event.data, event.lastEventId || undefined);
      };
      source.onerror = () => {
        if (this.connection !== connection) return;
        // EventSource reconnects by itself, with Last-Event-ID, unless the server refused it.
        if (source.readyState === SOURCE_CLOSED) this.retry();
        else this.setState({ state: 'reconnecting' });
      };
    }
  }

  private streamUrl(path: string, topics: string[]): URL {
    const url = new URL(path, this.base);
    url.searchParams.set('topics', topics.join(','));
    if (this.sessionId !== null) url.searchParams.set('session_id', this.sessionId);
    if (this.lastEventId !== null) url.searchParams.set('last_event_id', this.lastEventId);
    return url;
  }

  /** Drops the connection and tries again after a jittered, growing wait. */
  private retry(code?: number): void {
    this.disconnect();
    const backoff = this.options.backoff ?? {};
    const delayMs = backoffDelay(this.attempt++, backoff.initialMs ?? 500, backoff.maxMs ?? 30_000, this.options.random);
    this.setState({ state: 'reconnecting', delayMs, attempt: this.attempt, code });
    this.timer = setTimeout(() => this.open(), delayMs);
  }

  private disconnect(): void {
    clearTimeout(this.timer);
    const connection = this.connection;
    this.connection = undefined;
    if (connection?.kind === 'sse') connection.source.close();
    if (connection?.kind === 'ws') connection.socket.close();
    const lost = new ClientError({ code: 'disconnected', message: 'the connection dropped before the server answered' });
    for (const request of this.requests.values()) request.reject(lost);
    this.requests.clear();
  }

  private receive(text: string, sseId: string | undefined): void {
    let data: Record<string, any>;
    try {
      data = JSON.parse(text);
    } catch {
      return this.emit('error', { code: 'bad-event', message: `unreadable event: ${text.slice(0, 100)}` });
    }
    const id: string | undefined = sseId ?? data.id;
    if (id) this.lastEventId = id;
    if (data.type === 'subscriptions' || (data.error && data.ref !== undefined)) return this.answer(data);
    if (data.topic === CONFIG_TOPIC) return this.configure(data.payload ?? {});
    if (data.error) return this.emit('error', data.error);
    if (typeof data.topic !== 'string') return;
    const message: Message = { topic: data.topic, payload: data.payload, payload_base64: data.payload_base64, id };
    if (message.payload_base64 === undefined) delete message.payload_base64;
    if (id === undefined) delete message.id;
    this.emit('message', message);
    for (const handler of this.handlers.get(message.topic) ?? []) call(handler, message);
  }

  /** The config event: the session is known, so waiting requests may go, and the server's topics are brought to what is wanted. */
  private configure(config: { session_id?: string; subscriptions?: string[]; resumed?: boolean }): void {
    const connection = this.connection!;
    this.sessionId = config.session_id ?? null;
    // A gochan server may not list them: the session holds what the URL asked for.
    this.subscriptions = Array.isArray(config.subscriptions) ? config.subscriptions : connection.topics;
    this.attempt = 0;
    this.setState({ state: 'open', resumed: config.resumed === true });
    for (const waiter of this.waiters.splice(0)) waiter.resolve(undefined as never);
    // A new session starts with the URL's topics, and changes made while away are not in a resumed one.
    this.enqueue(() => {
      const add = [...this.wanted].filter((t) => !this.subscriptions.includes(t));
      const remove = this.subscriptions.filter((t) => !this.wanted.has(t));
      return this.request(add, remove);
    }).catch((err: ClientError) => {
      if (err.code !== 'closed') this.emit('error', { code: err.code, message: err.message, topic: err.topic });
    });
  }

  /** Runs subscription changes one after another, each once connected, again after a drop. */
  private enqueue(change: () => Promise<string[]>): Promise<string[]> {
    const run = async (): Promise<string[]> => {
      for (;;) {
        await this.ready();
        try {
          return await change();
        } catch (err) {
          if ((err as ClientError).code !== 'disconnected') throw err;
        }
      }
    };
    const result = this.chain.then(run, run);
    this.chain = result.catch(() => {});
    return result;
  }

  private ready(): Promise<void> {
    if (this.state === 'open') return Promise.resolve();
    if (this.state === 'closed') return Promise.reject(new ClientError({ code: 'closed', message: 'the client was closed' }));
    return new Promise((resolve, reject) => this.waiters.push({ resolve: resolve as (value: never) => void, reject }));
  }

  /** Sends one change: WebSocket frames, or POST /update_subscriptions in gochan's JSON shape. */
  private async request(add: string[], remove: string[]): Promise<string[]> {
    const connection = this.connection;
    if (connection?.kind === 'ws') {
      if (remove.length > 0) await this.frame(connection.socket, 'unsubscribe', remove);
      if (add.length > 0) await this.frame(connection.socket, 'subscribe', add);
      return this.subscriptions;
    }
    if (add.length === 0 && remove.length === 0) return this.subscriptions;
    const url = new URL(this.options.paths?.update ?? 'update_subscriptions', this.base).href;
    const res = await (this.options.fetch ?? fetch)(url, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ session_id: this.sessionId, add, remove }),
    }).catch((err: Error) => {
      throw new ClientError({ code: 'network', message: `update_subscriptions failed: ${err.message}` });
    });
    const text = await res.text();
    let body: Record<string, any> = {};
    try {
      body = JSON.parse(text);
    } catch {
      // gochan answers without a JSON body
    }
    if (!res.ok) throw new ClientError(body.error ?? { code: `http-${res.status}`, message: `update_subscriptions answered ${res.status}` });
    return this.applied(body, add, remove);
  }

  private frame(socket: Socket, type: 'subscribe' | 'unsubscribe', topics: string[]): Promise<string[]> {
    const ref = this.nextRef++;
    return new Promise<string[]>((resolve, reject) => {
      this.requests.set(ref, { resolve: resolve as (value: never) => void, reject });
      socket.send(JSON.stringify({ type, topics, ref }));
    });
  }

  /** A WebSocket answer to one of this client's frames. */
  private answer(data: Record<string, any>): void {
    const request = this.requests.get(data.ref);
    if (request === undefined) return;
    this.requests.delete(data.ref);
    try {
      if (data.error) throw new ClientError(data.error);
      request.resolve(this.applied(data, [], []) as never);
    } catch (err) {
      request.reject(err as ClientError);
    }
  }

  /** Records the server's topics after a change; a topic that failed to subscribe is an error. */
  private applied(body: Record<string, any>, add: string[], remove: string[]): string[] {
    this.subscriptions = Array.isArray(body.subscriptions) ? body.subscriptions : [...new Set([...this.subscriptions, ...add])].filter((t) => !remove.includes(t));
    const failed: ErrorInfo | undefined = body.failed?.[0];
    if (failed) throw new ClientError(failed);
    return this.subscriptions;
  }

  private setState(change: Omit<StateChange, 'sessionId'>): void {
    this.state = change.state;
    this.emit('state', { ...change, sessionId: this.sessionId });
  }

  private emit<K extends keyof ClientEvents>(type: K, event: ClientEvents[K]): void {
    for (const listener of this.listeners[type] as Set<Listener<K>>) call(listener, event);
  }
}

/** A listener that throws must not break the client: its error is reported, not swallowed. */
function call<T>(listener: (event: T) => void, event: T): void {
  try {
    listener(event);
  } catch (err) {
    queueMicrotask(() => {
      throw err;
    });
  }
}

function required(name: 'EventSource' | 'WebSocket'): new (url: string) => unknown {
  const found = (globalThis as Record<string, unknown>)[name];
  if (typeof found !== 'function') throw new Error(`no global ${name}: pass options.${name}`);
  return found as new (url: string) => unknown;
}
