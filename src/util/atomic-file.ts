import { closeSync, fsyncSync, openSync, readdirSync, readFileSync, renameSync, rmSync, writeSync } from 'node:fs';
import { open, rename, rm } from 'node:fs/promises';
import { dirname, basename, join } from 'node:path';
import { randomBytes } from 'node:crypto';

/** Where the atomic writers stage `path`: `.<name>.<8 hex>.tmp` beside it. */
function tempPathFor(path: string): string {
  return join(dirname(path), `.${basename(path)}.${randomBytes(4).toString('hex')}.tmp`);
}
const TEMP_NAME = /^\..+\.[0-9a-f]{8}\.tmp$/;

/**
 * A folder of one-JSON-file-per-record stores (leases, the spawn journal, the
 * outbox spool), read at start-up: every `*.json` parsed by `parse` (which
 * throws for a bad one), and the files that did not parse, for the caller to
 * report or remove. Temp files of writes a crash interrupted are removed: at
 * start-up no write of this process is under way.
 */
export function readJsonRecords<T>(dir: string, parse: (json: unknown) => T): { records: T[]; broken: string[] } {
  const records: T[] = [];
  const broken: string[] = [];
  for (const name of readdirSync(dir)) {
    const file = join(dir, name);
    if (TEMP_NAME.test(name)) {
      rmSync(file, { force: true });
      continue;
    }
    if (!name.endsWith('.json')) continue;
    try {
      records.push(parse(JSON.parse(readFileSync(file, 'utf8'))));
    } catch {
      broken.push(file);
    }
  }
  return { records, broken };
}

/**
 * Write a file so that readers see the old content or the new, never a torn
 * one, even across a crash: temp file in the same folder, fsync, rename, fsync
 * the folder. Mode applies from creation (no window with wider permissions).
 */
export function writeFileAtomic(path: string, data: string, mode = 0o600): void {
  const tmp = tempPathFor(path);
  const fd = openSync(tmp, 'wx', mode);
  try {
    writeAllSync(fd, Buffer.from(data, 'utf8'));
    fsyncSync(fd);
  } catch (err) {
    closeSync(fd);
    rmSync(tmp, { force: true });
    throw err;
  }
  closeSync(fd);
  renameSync(tmp, path);
  fsyncDirSync(dirname(path));
}

/**
 * write(2) may write less than asked (a file-size limit, a nearly full disk, a
 * signal): loop until every byte is written or a write fails. The next write
 * after a short one reports why (EFBIG, ENOSPC).
 */
export function writeAllSync(fd: number, buf: Buffer): void {
  let off = 0;
  while (off < buf.length) {
    const n = writeSync(fd, buf, off, buf.length - off);
    if (n <= 0) throw Object.assign(new Error('write made no progress'), { code: 'EIO' });
    off += n;
  }
}

export function fsyncDirSync(dir: string): void {
  const dirFd = openSync(dir, 'r');
  try {
    fsyncSync(dirFd);
  } finally {
    closeSync(dirFd);
  }
}

/**
 * The same as writeFileAtomic, on libuv's thread pool: the two fsyncs (ms each
 * on a busy disk) wait there instead of blocking the event loop, so other
 * requests go on meanwhile. Resolves once the file is durable.
 */
export async function writeFileAtomicAsync(path: string, data: string, mode = 0o600): Promise<void> {
  const tmp = tempPathFor(path);
  const fh = await open(tmp, 'wx', mode);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } catch (err) {
    await fh.close().catch(() => undefined);
    await rm(tmp, { force: true });
    throw err;
  }
  await fh.close();
  await rename(tmp, path);
  const dir = await open(dirname(path), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}
