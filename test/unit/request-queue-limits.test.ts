import { describe, expect, it } from 'vitest';
import { RequestQueue } from '../../src/agent/request-queue.js';

/** A job that runs until `release()` is called. */
function gate(): { job: () => Promise<void>; started: boolean; release: () => void } {
  let release!: () => void;
  const done = new Promise<void>((r) => (release = r));
  const g = {
    started: false,
    release: () => release(),
    job: async () => {
      g.started = true;
      await done;
    },
  };
  return g;
}

const tick = () => new Promise((r) => setTimeout(r, 0));

describe('RequestQueue.setLimits (config reload)', () => {
  it('a raised limit starts waiting jobs at once; a lowered one holds new jobs until enough finish', async () => {
    const queue = new RequestQueue(1, 10);
    const jobs = [gate(), gate(), gate(), gate()];
    const runs = jobs.map((g) => queue.offer(g.job, { priority: false })!);
    await tick();
    expect(jobs.map((g) => g.started)).toEqual([true, false, false, false]);
    queue.setLimits(3, 10);
    await tick();
    expect(jobs.map((g) => g.started)).toEqual([true, true, true, false]);
    queue.setLimits(1, 10);
    jobs[0]!.release();
    jobs[1]!.release();
    await tick();
    // Two finished, one still runs: at the new limit of 1 the fourth waits.
    expect(jobs[3]!.started).toBe(false);
    jobs[2]!.release();
    await tick();
    await tick();
    expect(jobs[3]!.started).toBe(true);
    jobs[3]!.release();
    await Promise.all(runs);
  });
});
