/**
 * Background jobs a component started and must wait for at shutdown. Every job
 * gets a rejection handler here: a failure is reported, never left unhandled
 * to end the process.
 */
export class Jobs {
  private readonly running = new Set<Promise<void>>();

  constructor(private readonly onError: (err: unknown) => void) {}

  /** Keep `job` until it settles; returns it. */
  track(job: Promise<void>): Promise<void> {
    this.running.add(job);
    job.then(
      () => this.running.delete(job),
      (err: unknown) => {
        this.running.delete(job);
        this.onError(err);
      },
    );
    return job;
  }

  /** Resolves once every job, including those started meanwhile, has settled. */
  async settled(): Promise<void> {
    while (this.running.size > 0) await Promise.allSettled([...this.running]);
  }
}
