import { readFileSync, rmSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { SeenStore } from '../../src/agent/seen.js';
import { mountTmpfs, type Tmpfs } from '../support/tmpfs.js';

const id = (n: number) => n.toString(16).padStart(64, '0');
const lines = (file: string) => readFileSync(file, 'utf8').split('\n').filter(Boolean);

const cleanup: Array<() => void> = [];
afterEach(() => {
  for (const c of cleanup.splice(0)) c();
});

describe('SeenStore', () => {
  it('compacts while running: expired ids leave the file and memory without a restart', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'pga-seen-'));
    cleanup.push(() => rmSync(dir, { recursive: true, force: true }));
    const seen = new SeenStore(dir, 1, { compactAfterLines: 10, compactIntervalMs: 0 });
    cleanup.push(() => seen.close());
    for (let i = 0; i < 100; i++) expect(seen.claim([id(i)])).toBe(true);
    expect(lines(join(dir, 'seen.log'))).toHaveLength(100);
    // Past the one-second retention, on a fake clock: only Date moves, the file I/O stays real.
    vi.useFakeTimers({ toFake: ['Date'] });
    cleanup.push(() => vi.useRealTimers());
    vi.setSystemTime(Date.now() + 2100);
    for (let i = 100; i < 200; i++) expect(seen.claim([id(i)])).toBe(true);
    await seen.synced();
    const now = lines(join(dir, 'seen.log'));
    // Without compaction while running: all 200 lines, the expired 100 included.
    expect(now.length).toBeLessThan(200);
    expect(now.some((l) => l.endsWith(id(5)))).toBe(false);
    expect(now.some((l) => l.endsWith(id(199)))).toBe(true);
    expect(seen.has(id(5))).toBe(false);
    expect(seen.has(id(150))).toBe(true);
  });

  describe('on a full disk', () => {
    let fs: Tmpfs;
    afterEach(() => fs?.unmount());

    it('starts, reports a claim it cannot write as unrecorded (nothing taken), and claims again once space is back', async () => {
      fs = mountTmpfs(64);
      const errors: string[] = [];
      const first = new SeenStore(fs.dir, 3600);
      for (let i = 0; i < 20; i++) first.claim([id(i)]);
      first.close();
      fs.fill();
      // Compaction at load cannot write: the store still starts, on the old log.
      const seen = new SeenStore(fs.dir, 3600, { onWriteError: (what, err) => errors.push(`${what}:${err.code}`) });
      cleanup.push(() => seen.close());
      expect(errors).toContain('compact:ENOSPC');
      expect(seen.has(id(3))).toBe(true);
      expect(seen.claim([id(3)])).toBe(false);
      // A page of ids, so the append cannot squeeze into the last partial page.
      const big = Array.from({ length: 80 }, (_, i) => id(500 + i));
      expect(seen.tryClaim(big)).toBe('unrecorded');
      expect(big.some((x) => seen.has(x))).toBe(false);
      fs.free();
      expect(seen.tryClaim(big)).toBe('claimed');
      await seen.synced();
      expect(seen.tryClaim([id(500)])).toBe('duplicate');
      // A restart reads every id, torn half-line of the failed append or not.
      const again = new SeenStore(fs.dir, 3600);
      cleanup.push(() => again.close());
      for (const x of [...big, id(0), id(19)]) expect(again.has(x)).toBe(true);
      expect(again.size).toBe(100);
    });
  });
});
