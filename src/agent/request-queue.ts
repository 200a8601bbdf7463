/**
 * Where requests wait for one of the `concurrency` processing slots: two
 * bounded FIFO lanes. The priority lane is for senders who hold a workload
 * (their stop or status must not wait behind a flood of strangers); the
 * normal lane is for everyone else. A lane that is full takes nothing more:
 * the caller answers `busy` (or drops), so memory and waiting time stay
 * bounded whatever arrives.
 */
export interface RequestQueueStats {
  running: number;
  queued: number;
  queuedPriority: number;
  /** Most requests ever waiting at once (both lanes). */
  queuedPeak: number;
}

export class RequestQueue {
  private running = 0;
  private readonly normal: Array<() => void> = [];
  private readonly priority: Array<() => void> = [];
  private peak = 0;

  constructor(
    private concurrency: number,
    private maxQueued: number,
  ) {
    this.setLimits(concurrency, maxQueued);
  }

  /**
   * New bounds (config reload). A raised concurrency starts waiting requests
   * at once; a lowered one lets running requests drain before waiting ones
   * start. A lowered queue bound refuses new arrivals; none already queued is dropped.
   */
  setLimits(concurrency: number, maxQueued: number): void {
    if (!(concurrency >= 1) || !(maxQueued >= 0)) throw new Error('request queue needs concurrency >= 1 and maxQueued >= 0');
    this.concurrency = concurrency;
    this.maxQueued = maxQueued;
    while (this.running < this.concurrency) {
      const next = this.nextWaiter();
      if (!next) break;
      this.running++;
      next();
    }
  }

  /**
   * Run `job` now if a slot is free, else queue it in its lane. Returns
   * undefined, and runs nothing, when it would have to wait and its lane is full.
   */
  offer<T>(job: () => Promise<T>, opts: { priority: boolean }): Promise<T> | undefined {
    if (this.running < this.concurrency) {
      this.running++;
      return this.exec(job);
    }
    const lane = opts.priority ? this.priority : this.normal;
    if (lane.length >= this.maxQueued) return undefined;
    const slotHandedOver = new Promise<void>((resolve) => lane.push(resolve));
    this.peak = Math.max(this.peak, this.normal.length + this.priority.length);
    return slotHandedOver.then(() => this.exec(job));
  }

  stats(): RequestQueueStats {
    return { running: this.running, queued: this.normal.length, queuedPriority: this.priority.length, queuedPeak: this.peak };
  }

  private nextWaiter(): (() => void) | undefined {
    return this.priority.shift() ?? this.normal.shift();
  }

  /** Runs in a slot already counted in `running`. */
  private async exec<T>(job: () => Promise<T>): Promise<T> {
    try {
      return await job();
    } finally {
      // The slot passes straight to the next waiter, so a request arriving
      // meanwhile cannot take it and exceed the concurrency; after a lowered
      // concurrency (setLimits) it is given up until running is below it.
      const next = this.running <= this.concurrency ? this.nextWaiter() : undefined;
      if (next) next();
      else this.running--;
    }
  }
}
