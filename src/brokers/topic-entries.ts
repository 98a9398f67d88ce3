import { RelayError } from '../errors.ts';
import { backoff } from './broker.ts';
import type { BrokerSubscription, SubscriptionListener } from './broker.ts';

/**
 * Bookkeeping shared by the drivers that hold ONE broker-side subscription per topic and fan
 * its messages out to that topic's listeners: the topic's first subscribe creates its entry and
 * sets it up once (`ready`), a failed setup removes the entry again, and the last listener to
 * leave tears it down.
 */

export interface TopicEntry {
  readonly listeners: Set<SubscriptionListener>;
  /** Settles once the broker-side subscription is in place (or could not be). */
  ready: Promise<void>;
}

/** The entries by topic: a Map, so drivers look entries up and iterate them as usual. */
export class TopicEntries<E extends TopicEntry> extends Map<string, E> {
  /**
   * `topic`'s entry. A missing one is made by `create` and set up at once by `start`, which
   * becomes its `ready`; if that fails, the entry is removed (unless replaced meanwhile) before
   * anyone waiting on `ready` hears of it.
   */
  obtain(topic: string, create: () => E, start: (entry: E) => Promise<void>): E {
    const found = this.get(topic);
    if (found !== undefined) return found;
    const entry = create();
    entry.ready = start(entry);
    this.set(topic, entry);
    entry.ready.catch(() => {
      if (this.get(topic) === entry) this.delete(topic);
    });
    return entry;
  }

  /**
   * Removes `listener` from `entry`. True when it was the last one and `entry` is still
   * `topic`'s: the entry is then removed too, and the caller tears down its broker side.
   */
  leave(topic: string, entry: E, listener: SubscriptionListener): boolean {
    entry.listeners.delete(listener);
    if (entry.listeners.size > 0 || this.get(topic) !== entry) return false;
    this.delete(topic);
    return true;
  }

  /**
   * subscribe() where the listener counts from the start: it joins the entry before the setup
   * ends, so the entry cannot be torn down under it meanwhile. Rejects when the setup fails,
   * with its RelayError or `failure(err)`. close() is idempotent; the last listener out awaits
   * `dispose(entry)`.
   */
  async join(topic: string, listener: SubscriptionListener, hooks: {
    create: () => E;
    start: (entry: E) => Promise<void>;
    failure: (err: unknown) => RelayError;
    dispose: (entry: E) => Promise<void>;
  }): Promise<BrokerSubscription> {
    const entry = this.obtain(topic, hooks.create, hooks.start);
    entry.listeners.add(listener);
    try {
      await entry.ready;
    } catch (err) {
      entry.listeners.delete(listener);
      throw err instanceof RelayError ? err : hooks.failure(err);
    }
    let open = true;
    return {
      close: async () => {
        if (!open) return;
        open = false;
        if (this.leave(topic, entry, listener)) await hooks.dispose(entry);
      },
    };
  }

  /**
   * subscribe() where the listener joins only once the entry is set up (a failed setup
   * rejects as `start` rejected). Resolves undefined when the entry was removed while it was
   * being set up (its last other listener left, or the broker closed): the caller starts over,
   * its checks included. A repeated close() returns the first one's promise; the last listener
   * out awaits `release(entry)`.
   */
  async joinWhenReady(topic: string, listener: SubscriptionListener, hooks: {
    create: () => E;
    start: (entry: E) => Promise<void>;
    release: (entry: E) => Promise<void>;
  }): Promise<BrokerSubscription | undefined> {
    const entry = this.obtain(topic, hooks.create, hooks.start);
    await entry.ready;
    if (this.get(topic) !== entry) return undefined;
    entry.listeners.add(listener);
    const leave = async () => {
      if (this.leave(topic, entry, listener)) await hooks.release(entry);
    };
    let closing: Promise<void> | undefined;
    return { close: () => (closing ??= leave()) };
  }

  /** Empties the registry, and awaits `dispose` for each entry whose setup succeeded, once it has. */
  async disposeAll(dispose: (entry: E) => Promise<void>): Promise<void> {
    const entries = [...this.values()];
    this.clear();
    await Promise.all(entries.map((entry) => entry.ready.then(() => dispose(entry), () => {})));
  }

  /** Tells every listener of every topic that delivery broke, with `error(topic)`. */
  failAll(error: (topic: string) => RelayError): void {
    for (const [topic, entry] of this) {
      for (const listener of entry.listeners) listener.error(error(topic));
    }
  }

  /** Tells every listener of every topic (that `only` accepts, when given) that delivery resumed. */
  recoverAll(only: (topic: string) => boolean = () => true): void {
    for (const [topic, entry] of this) {
      if (only(topic)) for (const listener of entry.listeners) listener.recovered();
    }
  }
}

/** An entry that the driver rebuilds itself after its broker-side subscription broke. */
export interface RestorableEntry extends TopicEntry {
  /** Reported broken to the listeners and not recovered yet. */
  failed: boolean;
  /** A restore() is running. */
  recovering: boolean;
  /** Torn down: never to be restored. */
  closed: boolean;
}

/**
 * Rebuilds a broken entry in the background, one run per entry at a time: retries `repair`
 * with backoff (telling `retrying` of each failure) until it succeeds or the entry or the
 * broker (`stopped`) closes. Then `discard` what repair may have recreated if the entry closed
 * meanwhile, else `resume` delivery.
 */
export async function restore(entry: RestorableEntry, hooks: {
  stopped: () => boolean;
  repair: () => Promise<void>;
  retrying: (err: unknown, attempt: number) => void;
  discard: () => Promise<unknown>;
  resume: () => void;
}): Promise<void> {
  if (entry.recovering) return;
  entry.recovering = true;
  try {
    for (let attempt = 1; !entry.closed && !hooks.stopped(); attempt++) {
      try {
        await hooks.repair();
      } catch (err) {
        hooks.retrying(err, attempt);
        await backoff(attempt);
        continue;
      }
      if (entry.closed) {
        await hooks.discard();
        return;
      }
      hooks.resume();
      return;
    }
  } finally {
    entry.recovering = false;
  }
}
