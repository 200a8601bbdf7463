/**
 * Reverter: undos run newest first, each once; a failing one does not stop
 * the rest; success forgets them.
 */
import { describe, expect, it } from 'vitest';
import { Reverter } from '../../src/util/revert.js';

describe('Reverter', () => {
  it('runs the undos newest first, awaiting each before the next', async () => {
    const r = new Reverter();
    const done: string[] = [];
    r.add(() => void done.push('directory'));
    r.add(async () => {
      await new Promise((resolve) => setTimeout(resolve, 5));
      done.push('port');
    });
    r.add(() => void done.push('process'));
    expect(await r.fail()).toEqual([]);
    expect(done).toEqual(['process', 'port', 'directory']);
  });

  it('runs every undo when some throw or reject, and returns their errors in the order they happened', async () => {
    const r = new Reverter();
    const done: string[] = [];
    const first = new Error('rm failed');
    const second = new Error('kill failed');
    r.add(() => void done.push('a'));
    r.add(() => {
      throw first;
    });
    r.add(() => void done.push('c'));
    r.add(() => Promise.reject(second));
    expect(await r.fail()).toEqual([second, first]);
    expect(done).toEqual(['c', 'a']);
  });

  it('runs each undo once however often fail is called', async () => {
    const r = new Reverter();
    let runs = 0;
    r.add(() => void runs++);
    await r.fail();
    await r.fail();
    expect(runs).toBe(1);
  });

  it('forgets the undos on success', async () => {
    const r = new Reverter();
    let runs = 0;
    r.add(() => void runs++);
    r.success();
    expect(await r.fail()).toEqual([]);
    expect(runs).toBe(0);
    // Still usable: an undo added afterwards runs.
    r.add(() => void runs++);
    await r.fail();
    expect(runs).toBe(1);
  });
});
