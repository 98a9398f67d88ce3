import { RelayError } from './errors.ts';
import { Fifo } from './fifo.ts';
import type { RelayMessage } from './frames.ts';

export interface OutboxLimits {
  /** Messages waiting for a slow reader before the oldest is dropped. */
  maxMessages: number;
  /** Bytes waiting for a slow reader before the oldest is dropped. */
  maxBytes: number;
  /** What to do when a reader falls that far behind: drop its oldest messages, or close it (it then resumes from history). */
  onOverflow: 'drop-oldest' | 'close';
  /**
   * How long a socket may stay full, taking nothing, before the connection is cut (ms). A
   * client that died without a FIN otherwise holds its outbox until TCP gives up, hours later;
   * a live one reconnects and resumes from history.
   */
  stallTimeoutMs: number;
}

/** Delivery counters, shared by all connections of a relay. */
export interface ConnectionStats {
  delivered: number;
  dropped: number;
}

/** What a connection says first: the session it serves (the config event of PROTOCOL.md 2.1). */
export interface ConfigPayload {
  session_id: string;
  subscriptions: string[];
  resumed: boolean;
  heartbeat_ms: number;
  session_ttl_ms: number;
}

type Pending = RelayMessage | RelayError;

// One flush per event-loop turn for every connection that got something: frames published
// in the same turn leave in one write per socket.
let dirty: QueuedConnection[] = [];
let flushScheduled = false;

function scheduleFlush(connection: QueuedConnection): void {
  dirty.push(connection);
  if (!flushScheduled) {
    flushScheduled = true;
    setImmediate(flushDirty);
  }
}

function flushDirty(): void {
  flushScheduled = false;
  const batch = dirty;
  dirty = [];
  const now = Date.now();
  for (const connection of batch) connection.flush(now);
}

/**
 * A client connection with a bounded outbox: messages queue while the socket is saturated,
 * and a reader that stops reading loses its own oldest messages (or its connection), never
 * anyone else's. Transports implement how a batch is written.
 */
export abstract class QueuedConnection {
  abstract readonly transport: string;
  private readonly stats: ConnectionStats;
  /** When messages were last written (ms), so heartbeats go only to quiet connections. */
  lastWriteAt = Date.now();
  protected closed = false;
  private readonly queue = new Fifo<Pending>();
  private queuedBytes = 0;
  private lost = 0;
  private writable = true;
  /** When the socket last became full (undefined while it takes writes). */
  private saturatedSince: number | undefined;
  private isDirty = false;
  private readonly limits: OutboxLimits;
  /** Called once when the connection ends, whoever ended it. */
  onClose: (() => void) | undefined;
  /** Called when messages are dropped for this reader. */
  onDrop: ((count: number) => void) | undefined;

  constructor(limits: OutboxLimits, stats: ConnectionStats) {
    this.limits = limits;
    this.stats = stats;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Queues a message for this client. */
  send(message: RelayMessage): void {
    if (this.closed) return;
    // A burst larger than the outbox within one turn is not a slow reader: write it out now.
    if (this.writable && this.overflows(message)) this.flush();
    if (this.overflows(message)) {
      if (this.limits.onOverflow === 'close') {
        this.lose(1);
        // Ended hard: a reader this far behind would not read a clean end either. It resumes from history.
        this.close(true);
        return;
      }
      this.dropOldest(message);
    }
    this.queue.push(message);
    this.queuedBytes += message.byteLength;
    this.markDirty();
  }

  /**
   * Writes a resume's replay at once, after what is queued. It is exempt from the outbox bound:
   * the messages are already held (and bounded) by the topics' history, and a replay larger than
   * the outbox would otherwise be dropped, or closed, on every reconnect.
   */
  replay(messages: RelayMessage[]): void {
    if (this.closed) return;
    for (const message of messages) this.queue.push(message);
    this.flush();
  }

  /** Queues an error event (subscription-failure, events-lost, …) in order with messages. */
  sendError(error: RelayError): void {
    if (this.closed) return;
    this.queue.push(error);
    this.markDirty();
  }

  /** Records messages this client will never get, reported as one `events-lost` before the next write. */
  lose(count: number): void {
    this.lost += count;
    this.stats.dropped += count;
    this.onDrop?.(count);
  }

  /** Writes what is queued, as far as the transport accepts it. */
  flush(now = Date.now()): void {
    this.isDirty = false;
    if (this.closed || !this.writable) return;
    if (this.queue.length === 0 && this.lost === 0) return;
    const lost = this.lost;
    this.lost = 0;
    const items = this.queue.drain();
    this.queuedBytes = 0;
    let delivered = 0;
    for (const item of items) if (!(item instanceof RelayError)) delivered++;
    this.stats.delivered += delivered;
    this.lastWriteAt = now;
    // Cleared before writing: a sink may report `drained` synchronously inside the write (node's
    // ServerResponse does on uncork when the kernel takes everything), and that must not be undone.
    this.writable = false;
    if (this.writeBatch(items, lost)) this.writable = true;
    if (!this.writable) this.saturatedSince ??= now;
  }

  /** The transport calls this when a saturated socket can take more. */
  protected drained(): void {
    this.writable = true;
    this.saturatedSince = undefined;
    if (this.queue.length > 0 || this.lost > 0) this.markDirty();
  }

  /** Ends the connection (the client may reconnect and resume): cleanly, or at once when `abort`. */
  close(abort = false): void {
    if (this.closed) return;
    this.closed = true;
    this.queue.clear();
    this.queuedBytes = 0;
    this.end(abort);
    this.onClose?.();
  }

  /**
   * Ends the connection because the relay is going away: what is queued is written first, then
   * a transport that can say so tells the client to reconnect after `reconnectDelayMs` (SSE: a
   * `retry:` line; WebSocket closes with 1001 whenever the relay is closing).
   */
  goAway(reconnectDelayMs?: number): void {
    if (this.closed) return;
    this.flush();
    if (reconnectDelayMs !== undefined) this.reconnectIn(reconnectDelayMs);
    this.close();
  }

  /** Tells the client when to reconnect, just before a clean end; transports without a way to say it do nothing. */
  protected reconnectIn(_delayMs: number): void {}

  /**
   * Called for quiet connections: sends a keep-alive, or, to a socket that is full, nothing —
   * and cuts it once it has taken nothing for stallTimeoutMs.
   */
  keepAlive(now: number): void {
    if (this.closed) return;
    if (this.writable) {
      // As in flush(): a keep-alive can be the write that fills the socket, which starts the stall clock.
      this.writable = false;
      if (this.heartbeat()) this.writable = true;
      if (!this.writable) this.saturatedSince ??= now;
    } else if (this.saturatedSince !== undefined && now - this.saturatedSince >= this.limits.stallTimeoutMs) this.close(true);
  }

  /** The transport calls this when the client went away. */
  protected gone(): void {
    if (this.closed) return;
    this.closed = true;
    this.queue.clear();
    this.queuedBytes = 0;
    this.onClose?.();
  }

  /** Sends the config event; called once, before any message. `id` is the resume position. */
  abstract open(config: ConfigPayload, id: string, retryMs: number): void;
  /** Writes a keep-alive if the transport needs one. Returns false when that left it saturated. */
  protected abstract heartbeat(): boolean;
  /** Writes queued items (oldest first), preceded by an events-lost report when `lost` > 0. Returns false when saturated. */
  protected abstract writeBatch(items: Pending[], lost: number): boolean;
  /** Ends the underlying stream: cleanly, or destroyed at once when `abort`. */
  protected abstract end(abort: boolean): void;

  /** Drops the oldest messages until `message` fits. Queued error events are kept: they cannot be replayed. */
  private dropOldest(message: RelayMessage): void {
    const kept: RelayError[] = [];
    while (this.queue.length > 0 && this.overflows(message)) {
      const old = this.queue.shift()!;
      if (old instanceof RelayError) {
        kept.push(old);
      } else {
        this.queuedBytes -= old.byteLength;
        this.lose(1);
      }
    }
    if (kept.length === 0) return;
    const rest = this.queue.drain();
    for (const item of [...kept, ...rest]) this.queue.push(item);
  }

  private overflows(message: RelayMessage): boolean {
    return this.queue.length >= this.limits.maxMessages || this.queuedBytes + message.byteLength > this.limits.maxBytes;
  }

  private markDirty(): void {
    if (this.isDirty || !this.writable) return;
    this.isDirty = true;
    scheduleFlush(this);
  }
}

export function eventsLostError(count: number): RelayError {
  return new RelayError('events-lost', `${count} event${count === 1 ? ' was' : 's were'} dropped because this client read too slowly`, { count });
}
