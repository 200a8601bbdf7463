/**
 * Child process for the short-write test: overwrite `argv[2]` atomically with
 * `argv[3]` lines, under whatever file-size limit the parent started it with.
 * Prints `ok` or the error code.
 */
import { writeFileAtomic } from '../../src/util/atomic-file.js';

const [file, count] = process.argv.slice(2);
const lines = Array.from({ length: Number(count) }, (_, i) => `${1_700_000_000 + i} ${i.toString(16).padStart(64, '0')}\n`).join('');
try {
  writeFileAtomic(file!, lines);
  process.stdout.write('ok\n');
} catch (err) {
  process.stdout.write(`${(err as NodeJS.ErrnoException).code ?? 'error'}\n`);
}
