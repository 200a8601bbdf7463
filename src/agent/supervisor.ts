/**
 * The clock of a workload's life: every `tickMs` it asks `Workloads` to look
 * at each lease (expiry, a warning shortly before, a process that died after
 * boot). What happens to a workload is decided there; this only keeps time,
 * and never runs two looks at once.
 */
import type { Workloads } from './workloads.js';

export interface SupervisorOptions {
  workloads: Workloads;
  /** How often leases are checked for expiry and dead processes. */
  tickMs: number;
}

export class Supervisor {
  private timer: NodeJS.Timeout | undefined;
  private ticking: Promise<void> | undefined;

  constructor(private readonly opts: SupervisorOptions) {}

  start(): void {
    this.timer = setInterval(() => {
      this.ticking ??= this.opts.workloads.supervise().finally(() => (this.ticking = undefined));
    }, this.opts.tickMs);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    clearInterval(this.timer);
    await this.ticking;
  }
}
