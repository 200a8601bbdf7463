/**
 * A workload's console as far as it is kept. qemu holds the serial output in
 * a ring in its memory (argv.ts), so a guest writing without end cannot fill
 * the host's disk; reading drains the ring over QMP into serial.log, at most
 * `capBytes`, oldest dropped first. A VM started before the console became a
 * ring (a file chardev) has no ring to read: its serial.log is read as it is.
 */
import { appendFile, readFile, writeFile } from 'node:fs/promises';
import { KeyedTurns } from '../../util/keyed-turns.js';
import type { Logger } from '../../util/logger.js';
import { readConsoleRing } from './argv.js';
import { runQmp } from './qmp.js';
import { vmFile } from './workload-files.js';

export const DEFAULT_CONSOLE_LOG_BYTES = 256 * 1024;

export class ConsoleLogs {
  /** Console text kept per workload being watched (the file's content, or newer when the disk was full). */
  private readonly kept = new Map<string, { text: Buffer; dirty: boolean }>();
  /** Reads per workload run one after another: each appends what the previous left. */
  private readonly reads = new KeyedTurns();

  constructor(
    private readonly capBytes: number,
    private readonly logger: Logger,
  ) {}

  /** Drain the ring of the workload in `dir` into its serial.log and return the kept text. */
  read(id: string, dir: string): Promise<string> {
    return this.reads.run(id, () => this.drain(id, dir));
  }

  /** Nobody watches this console any more: qemu's ring bounds it from here on. */
  forget(id: string): void {
    this.kept.delete(id);
  }

  private async drain(id: string, dir: string): Promise<string> {
    const file = vmFile(dir, 'serialLog');
    const cap = this.capBytes;
    let kept = this.kept.get(id);
    if (!kept) {
      kept = { text: await readTail(file, cap), dirty: false };
      this.kept.set(id, kept);
    }
    let chunk: Buffer;
    try {
      const [ret] = await runQmp(vmFile(dir, 'qmpSocket'), readConsoleRing(), 2000);
      chunk = Buffer.from(typeof ret === 'string' ? ret : '', 'base64');
    } catch (err) {
      // qemu gone (its ring with it) or no ring (an older VM): what is kept is all there is.
      this.logger.debug({ workloadId: id, err: (err as Error).message }, 'console ring not read');
      return kept.text.toString('utf8');
    }
    if (chunk.length === 0 && !kept.dirty) return kept.text.toString('utf8');
    let text = Buffer.concat([kept.text, chunk]);
    // Past the cap, keep the newer half: the file is rewritten once per half a cap of output, not at every read.
    const rewrite = kept.dirty || text.length > cap;
    if (text.length > cap) text = text.subarray(text.length - Math.floor(cap / 2));
    kept.text = text;
    try {
      if (rewrite) await writeFile(file, text, { mode: 0o600 });
      else await appendFile(file, chunk, { mode: 0o600 });
      kept.dirty = false;
    } catch (err) {
      // A full disk: the text stays in memory, and the file is rewritten whole once it can be.
      kept.dirty = true;
      this.logger.debug({ workloadId: id, code: (err as NodeJS.ErrnoException).code }, 'console log not written');
    }
    return text.toString('utf8');
  }
}

/** The last `max` bytes of a file, or nothing. */
async function readTail(file: string, max: number): Promise<Buffer> {
  try {
    const buf = await readFile(file);
    return buf.length > max ? buf.subarray(buf.length - max) : buf;
  } catch {
    return Buffer.alloc(0);
  }
}
