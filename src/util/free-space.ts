import { statfsSync } from 'node:fs';
import path from 'node:path';

/**
 * Bytes the calling user may still write on the disk holding `dir`. A folder
 * not made yet is answered for its nearest existing ancestor (same disk).
 * Synchronous: admission decides in one turn of the event loop.
 */
export function freeBytesUnder(dir: string): number {
  let probe = dir;
  for (;;) {
    try {
      const st = statfsSync(probe);
      return st.bavail * st.bsize;
    } catch (err) {
      const parent = path.dirname(probe);
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || parent === probe) throw err;
      probe = parent;
    }
  }
}
