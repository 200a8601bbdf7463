/**
 * RequestQueue: concurrency, a bound per lane, and the tenant lane served first.
 */
import { describe, expect, it } from 'vitest';
import { RequestQueue } from '../../src/agent/request-queue.js';

function gate(): { wait: Promise<void>; open: () => void } {
  let open!: () => void;
  const wait = new Promise<void>((r) => (open = r));
  return { wait, open };
}

describe('RequestQueue', () => {
  it('runs up to its concurrency, queues up to its bound per lane, refuses beyond, and serves the tenant lane first', async () => {
    const q = new RequestQueue(1, 2);
    const order: string[] = [];
    const first = gate();
    const job = (name: string, wait?: Promise<void>) => async () => {
      order.push(name);
      await wait;
    };
    const running = q.offer(job('running', first.wait), { priority: false });
    expect(running).toBeDefined();
    const queued = [q.offer(job('n1'), { priority: false }), q.offer(job('n2'), { priority: false })];
    expect(queued.every(Boolean)).toBe(true);
    // The stranger lane is full; the tenant lane is not.
    expect(q.offer(job('n3'), { priority: false })).toBeUndefined();
    const tenant = q.offer(job('t1'), { priority: true });
    expect(tenant).toBeDefined();
    expect(q.stats()).toMatchObject({ running: 1, queued: 2, queuedPriority: 1, queuedPeak: 3 });
    first.open();
    await Promise.all([running, ...queued, tenant]);
    expect(order).toEqual(['running', 't1', 'n1', 'n2']);
    expect(q.stats()).toMatchObject({ running: 0, queued: 0, queuedPriority: 0 });
  });

  it('a slot freed is handed to the next waiter: a newcomer cannot exceed the concurrency', async () => {
    const q = new RequestQueue(1, 5);
    let active = 0;
    let most = 0;
    const job = async () => {
      active++;
      most = Math.max(most, active);
      await new Promise((r) => setImmediate(r));
      active--;
    };
    const all: Array<Promise<void> | undefined> = [];
    for (let i = 0; i < 5; i++) all.push(q.offer(job, { priority: false }));
    // Newcomers arrive while slots change hands.
    for (let i = 0; i < 20; i++) {
      await new Promise((r) => setImmediate(r));
      all.push(q.offer(job, { priority: i % 2 === 0 }));
    }
    await Promise.all(all);
    expect(most).toBe(1);
  });
});
