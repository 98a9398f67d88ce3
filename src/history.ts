import { Fifo } from './fifo.ts';
import type { RelayMessage } from './frames.ts';

export interface HistoryLimits {
  /** Messages kept per topic. */
  maxMessages: number;
  /** Bytes kept per topic. */
  maxBytes: number;
  /** Age after which a message is no longer kept, in ms. */
  maxAgeMs: number;
}

/**
 * A topic's recent messages, kept so that a session that reconnects can be replayed what it
 * missed. One history per topic, shared by all its sessions (a session keeps only a position),
 * so memory does not grow with the number of subscribers.
 */
export class TopicHistory {
  private readonly entries = new Fifo<RelayMessage>();
  private bytes = 0;
  /** The highest sequence number ever evicted: positions before it may have missed messages. */
  private evictedThrough = 0;
  private readonly limits: HistoryLimits;

  constructor(limits: HistoryLimits) {
    this.limits = limits;
  }

  append(message: RelayMessage): void {
    if (this.limits.maxMessages <= 0) {
      this.evictedThrough = message.seq;
      return;
    }
    this.entries.push(message);
    this.bytes += message.byteLength;
    while (this.entries.length > this.limits.maxMessages || (this.bytes > this.limits.maxBytes && this.entries.length > 0)) {
      this.evictOldest();
    }
  }

  /**
   * The messages after `seq`, and whether some after it were already evicted (so the caller
   * must report `events-lost`).
   */
  since(seq: number, now: number): { messages: RelayMessage[]; incomplete: boolean } {
    this.expire(now);
    const messages: RelayMessage[] = [];
    for (let i = 0; i < this.entries.length; i++) {
      const m = this.entries.at(i)!;
      if (m.seq > seq) messages.push(m);
    }
    return { messages, incomplete: this.evictedThrough > seq };
  }

  /** Drops what is older than maxAgeMs. */
  expire(now: number): void {
    const oldest = now - this.limits.maxAgeMs;
    while (this.entries.length > 0 && this.entries.peek()!.receivedAt < oldest) this.evictOldest();
  }

  get size(): number {
    return this.entries.length;
  }

  private evictOldest(): void {
    const m = this.entries.shift()!;
    this.bytes -= m.byteLength;
    this.evictedThrough = m.seq;
  }
}
