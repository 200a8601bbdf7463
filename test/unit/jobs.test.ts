import { describe, expect, it } from 'vitest';
import { Jobs } from '../../src/util/jobs.js';
import { Gate } from '../support/gate.js';

describe('Jobs', () => {
  it('settles only once jobs started while waiting have settled too, and reports rejections', async () => {
    const errors: unknown[] = [];
    const jobs = new Jobs((err) => errors.push(err));
    const first = new Gate();
    const second = new Gate();
    let secondDone = false;
    jobs.track(
      first.passed.then(() => {
        jobs.track(second.passed.then(() => void (secondDone = true)));
        throw new Error('boom');
      }),
    );
    const settled = jobs.settled();
    first.release();
    await new Promise((r) => setImmediate(r));
    second.release();
    await settled;
    expect(secondDone).toBe(true);
    expect(errors).toHaveLength(1);
  });
});
