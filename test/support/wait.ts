/** Waiting in tests for state that arrives asynchronously (events, frames, output), without fixed sleeps. */
export class Waiter {
  private waiting: Array<() => void> = [];

  /**
   * Resolves once `predicate()` holds: checked again on every wake(), and at least every
   * `pollMs` for state that changes without one. After `ms`, rejects with `timedOut()`, built
   * then so that it can show the state at that moment.
   */
  async until(predicate: () => boolean, ms: number, timedOut: () => Error, pollMs = 100): Promise<void> {
    const deadline = Date.now() + ms;
    while (!predicate()) {
      const left = deadline - Date.now();
      if (left <= 0) throw timedOut();
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.min(left, pollMs));
        this.waiting.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  /** The state changed: every pending until() checks its predicate now. */
  wake(): void {
    const waiting = this.waiting;
    this.waiting = [];
    for (const resolve of waiting) resolve();
  }
}
