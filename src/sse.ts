import { QueuedConnection, eventsLostError, type ConfigPayload, type ConnectionStats, type OutboxLimits } from './connection.ts';
import { RelayError } from './errors.ts';
import { HEARTBEAT_FRAME, configFrame, errorFrame, type RelayMessage } from './frames.ts';

/** Where an SSE stream's bytes go: a node:http response or a web ReadableStream. */
export interface ByteSink {
  /** Writes the chunks in order; false when the reader is saturated (then `drained` follows). */
  write(chunks: Buffer[]): boolean;
  /**
   * Optional: writes one event, `prefix` then `tail`, as `write([prefix, tail])` would. The
   * common batch (one message per socket per turn) then allocates no array on the fan-out path.
   */
  writeEvent?(prefix: Buffer, tail: Buffer): boolean;
  /** Ends the stream cleanly. */
  end(): void;
  /** Tears the stream down at once, discarding what is buffered. */
  destroy(): void;
}

/** The events of a sink that an SSE connection listens to. */
export interface SinkEvents {
  drained(): void;
  gone(): void;
}

/** A Server-Sent Events stream (PROTOCOL.md section 2). */
export class SseConnection extends QueuedConnection {
  readonly transport = 'sse';
  private readonly sink: ByteSink;
  private readonly idPrefix: Buffer;

  constructor(sink: ByteSink, idPrefix: Buffer, limits: OutboxLimits, stats: ConnectionStats) {
    super(limits, stats);
    this.sink = sink;
    this.idPrefix = idPrefix;
  }

  /** The callbacks a sink adapter must wire to its stream's events. */
  get events(): SinkEvents {
    return { drained: () => this.drained(), gone: () => this.gone() };
  }

  open(config: ConfigPayload, id: string, retryMs: number): void {
    if (!this.closed) this.sink.write([configFrame(retryMs, id, config)]);
  }

  protected heartbeat(): boolean {
    return this.sink.write([HEARTBEAT_FRAME]);
  }

  protected writeBatch(items: (RelayMessage | RelayError)[], lost: number): boolean {
    if (lost === 0 && items.length === 1 && this.sink.writeEvent !== undefined) {
      const item = items[0]!;
      if (!(item instanceof RelayError)) return this.sink.writeEvent(this.idPrefix, item.sseTail);
    }
    const chunks: Buffer[] = [];
    if (lost > 0) chunks.push(errorFrame(eventsLostError(lost)));
    for (const item of items) {
      if (item instanceof RelayError) chunks.push(errorFrame(item));
      else chunks.push(this.idPrefix, item.sseTail);
    }
    return this.sink.write(chunks);
  }

  // A bare `retry:` field sets EventSource's reconnection time without dispatching an event.
  protected override reconnectIn(delayMs: number): void {
    this.sink.write([Buffer.from(`retry: ${delayMs}\n\n`)]);
  }

  protected end(abort: boolean): void {
    if (abort) this.sink.destroy();
    else this.sink.end();
  }
}
