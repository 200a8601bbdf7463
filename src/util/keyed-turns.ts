/**
 * Runs async steps one after another per key (lease writes per workload,
 * top-ups per workload), while different keys run freely. A step runs after
 * every earlier step of its key has ended, however it ended; the map only
 * holds keys with a step pending.
 */
export class KeyedTurns {
  private readonly tails = new Map<string, Promise<unknown>>();

  run<T>(key: string, step: () => Promise<T>): Promise<T> {
    const next = (this.tails.get(key) ?? Promise.resolve()).catch(() => undefined).then(step);
    this.tails.set(key, next);
    const forget = (): void => {
      if (this.tails.get(key) === next) this.tails.delete(key);
    };
    next.then(forget, forget);
    return next;
  }

  /** Resolves once every step of `key` asked for so far has ended. */
  async settled(key: string): Promise<void> {
    await this.tails.get(key)?.catch(() => undefined);
  }
}
