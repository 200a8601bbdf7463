/**
 * Reverter: undos run newest first, each once; a failing one does not stop
 * the rest; success forgets them.
 */
import { describe, expect, it } from 'vitest';
import { Reverter } from '../../src/util/revert.js';

describe('Reverter', () => {
  it('runs the undos newest first, awaiting each before the next', async () => {
    const r = new Reverter(() => undefined);
    const done: string[] = [];
    r.add(() => void done.push('directory'));
    r.add(async () => {
      await new Promise((resolve) => setTimeout(resolve, 5));
      done.push('port');
    });
    r.add(() => void done.push('process'));
    await r.fail();
    expect(done).toEqual(['process', 'port', 'directory']);
  });

  it('runs every undo when some throw or reject, and reports their errors in the order they happened', async () => {
    const errors: unknown[] = [];
    const r = new Reverter((err) => errors.push(err));
    const done: string[] = [];
    const first = new Error('rm failed');
    const second = new Error('kill failed');
    r.add(() => void done.push('a'));
    r.add(() => {
      throw first;
    });
    r.add(() => void done.push('c'));
    r.add(() => Promise.reject(second));
    await r.fail();
    expect(errors).toEqual([second, first]);
    expect(done).toEqual(['c', 'a']);
  });

  it('runs each undo once however often fail is called', async () => {
    const r = new Reverter(() => undefined);
    let runs = 0;
    r.add(() => void runs++);
    await r.fail();
    await r.fail();
    expect(runs).toBe(1);
  });

  it('forgets the undos on success', async () => {
    const r = new Reverter(() => undefined);
    let runs = 0;
    r.add(() => void runs++);
    r.success();
    await r.fail();
    expect(runs).toBe(0);
    // Still usable: an undo added afterwards runs.
    r.add(() => void runs++);
    await r.fail();
    expect(runs).toBe(1);
  });

  it('undoes a nested attempt once: on its own retry, not again with the outer', async () => {
    const r = new Reverter(() => undefined);
    const done: string[] = [];
    r.add(() => void done.push('directory'));
    const first = new Reverter(() => undefined);
    r.add(() => first.fail());
    first.add(() => void done.push('port 1'));
    await first.fail();
    const second = new Reverter(() => undefined);
    r.add(() => second.fail());
    second.add(() => void done.push('port 2'));
    await r.fail();
    expect(done).toEqual(['port 1', 'port 2', 'directory']);
  });
});
