/**
 * A small tmpfs of its own for disk-full tests (needs root, as the guest tests
 * do): mounted on a fresh folder, filled to the last byte on demand, emptied
 * again, unmounted at the end.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, statfsSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface Tmpfs {
  dir: string;
  /** Take every free byte (a filler file), so the next write fails with ENOSPC. */
  fill(): void;
  /** Remove the filler. */
  free(): void;
  freeBytes(): number;
  unmount(): void;
}

export function mountTmpfs(sizeKb: number, opts: { inodes?: number } = {}): Tmpfs {
  const dir = mkdtempSync(join(tmpdir(), 'pga-tmpfs-'));
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${sizeKb}k,mode=0700${opts.inodes ? `,nr_inodes=${opts.inodes}` : ''}`, 'tmpfs', dir]);
  const filler = join(dir, '.filler');
  const freeBytes = () => {
    const s = statfsSync(dir);
    return s.bavail * s.bsize;
  };
  return {
    dir,
    freeBytes,
    fill() {
      const fd = openSync(filler, 'a');
      const chunk = Buffer.alloc(4096);
      try {
        for (;;) writeSync(fd, chunk);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
      } finally {
        closeSync(fd);
      }
      // A last partial page may still fit a few bytes: take them too.
      const fd2 = openSync(filler, 'a');
      try {
        for (;;) writeSync(fd2, Buffer.alloc(1));
      } catch {
        /* full */
      } finally {
        closeSync(fd2);
      }
    },
    free() {
      rmSync(filler, { force: true });
    },
    unmount() {
      try {
        execFileSync('umount', ['-l', dir]);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    },
  };
}
