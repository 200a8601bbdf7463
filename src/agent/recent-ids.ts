/**
 * Ids remembered in memory only, for a while and up to a count: the oldest
 * goes first when full. Insertion order is expiry order (one TTL for all), so
 * pruning is from the front.
 */
export class RecentIds {
  private readonly expiry = new Map<string, number>();

  constructor(
    private readonly max: number,
    private readonly ttlMs: number,
    private readonly now: () => number = Date.now,
  ) {}

  has(id: string): boolean {
    const exp = this.expiry.get(id);
    return exp !== undefined && exp > this.now();
  }

  add(ids: readonly string[]): void {
    const now = this.now();
    for (const id of ids) {
      this.expiry.delete(id);
      this.expiry.set(id, now + this.ttlMs);
    }
    for (const [id, exp] of this.expiry) {
      if (this.expiry.size <= this.max && exp > now) break;
      this.expiry.delete(id);
    }
  }

  get size(): number {
    return this.expiry.size;
  }
}
