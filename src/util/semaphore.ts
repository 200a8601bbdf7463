/** Bounds how many async jobs run at once; the rest wait in FIFO order. */
export class Semaphore {
  private active = 0;
  private readonly waiting: Array<() => void> = [];

  constructor(private limit: number) {}

  /** Change the bound (config reload); a raised bound lets waiting jobs start at once. */
  setLimit(limit: number): void {
    const free = limit - Math.max(this.active, this.limit);
    this.limit = limit;
    for (let i = 0; i < free && this.waiting.length; i++) this.waiting.shift()!();
  }

  async run<T>(job: () => Promise<T>): Promise<T> {
    if (this.active >= this.limit) await new Promise<void>((resolve) => this.waiting.push(resolve));
    this.active++;
    try {
      return await job();
    } finally {
      this.active--;
      // Below the limit only: after setLimit lowered it, running jobs drain first.
      if (this.active < this.limit) this.waiting.shift()?.();
    }
  }
}
