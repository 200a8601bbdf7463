/**
 * Child process for the short-write tests: for each `file count` pair of
 * arguments, overwrite `file` atomically with `count` lines, under whatever
 * file-size limit the parent started it with. Prints one line per pair: `ok`
 * or the error code. Several pairs share one process, as tsx's start costs
 * more than the writes.
 */
import { writeFileAtomic } from '../../src/util/atomic-file.js';

const args = process.argv.slice(2);
for (let i = 0; i + 1 < args.length; i += 2) {
  const lines = Array.from({ length: Number(args[i + 1]) }, (_, n) => `${1_700_000_000 + n} ${n.toString(16).padStart(64, '0')}\n`).join('');
  try {
    writeFileAtomic(args[i]!, lines);
    process.stdout.write('ok\n');
  } catch (err) {
    process.stdout.write(`${(err as NodeJS.ErrnoException).code ?? 'error'}\n`);
  }
}
