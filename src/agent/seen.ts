/**
 * Remembers which events and requests were already taken, across restarts, so
 * that re-reading the relays' two-day window after a restart (or the same
 * wrap arriving from three relays) never runs a request twice.
 *
 * Append-only log of `<unix seconds> <id>` lines, compacted (entries older
 * than the retention dropped, which must exceed the subscription's `since`
 * window) at load and again while running once it holds many dead lines.
 *
 * Durability: `claim` appends synchronously (so claims are ordered and a
 * second claim of the same id in this run sees the first), `synced()` waits
 * for an fdatasync covering every claim made so far. Claims made while one
 * fdatasync runs share the next one (group commit): a burst of requests costs
 * one or two syncs, not one each, and the event loop never waits for the disk.
 *
 * A full disk: a claim that cannot be written is not taken (memory unchanged)
 * and reported as `unrecorded`; the caller holds the request and retries.
 */
import { closeSync, existsSync, mkdirSync, openSync, readFileSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { HEX64 } from '../util/hex.js';
import { writeAllSync, writeFileAtomic } from '../util/atomic-file.js';

export type ClaimResult = 'claimed' | 'duplicate' | 'unrecorded';

export interface SeenStoreOptions {
  /**
   * Compact once the log has grown past this many lines and to twice its size
   * after the last compaction: each line is rewritten O(1) times on average,
   * and the file stays within twice the live ids plus this.
   */
  compactAfterLines?: number;
  /** At most one compaction attempt per this many ms while running (default one minute). */
  compactIntervalMs?: number;
  /** Called when the log cannot be written or compacted, with what was being done. */
  onWriteError?: (what: 'append' | 'compact' | 'sync', err: NodeJS.ErrnoException) => void;
}

export class SeenStore {
  private readonly file: string;
  private readonly seen = new Map<string, number>();
  private fd: number | undefined;
  private syncHandle: Promise<FileHandle> | undefined;
  /** Lines in the file (live or not); compaction resets it. */
  private lines = 0;
  private linesAfterCompaction = 0;
  /** A failed append may have left half a line: the next append starts with a newline. */
  private torn = false;
  /** Bumped by every append; `synced()` waits until an fdatasync started after it. */
  private written = 0;
  private syncedUpTo = 0;
  private syncing: Promise<void> | undefined;
  private lastCompactAttempt = 0;
  private readonly compactAfterLines: number;

  constructor(
    stateDir: string,
    private readonly retentionSeconds: number,
    private readonly opts: SeenStoreOptions = {},
  ) {
    mkdirSync(stateDir, { recursive: true, mode: 0o700 });
    this.file = join(stateDir, 'seen.log');
    this.compactAfterLines = opts.compactAfterLines ?? 10_000;
    this.load();
  }

  private load(): void {
    if (existsSync(this.file)) {
      const cutoff = now() - this.retentionSeconds;
      const text = readFileSync(this.file, 'utf8');
      for (const line of text.split('\n')) {
        const [ts, id] = line.split(' ');
        const t = Number(ts);
        if (id && HEX64.test(id) && Number.isFinite(t) && t >= cutoff) this.seen.set(id, t);
        if (line) this.lines++;
      }
      this.torn = text.length > 0 && !text.endsWith('\n');
    }
    // A full disk must not stop the start: the old log stays and is appended to.
    this.compact();
  }

  has(id: string): boolean {
    return this.seen.has(id);
  }

  /** Live ids held (bounded by the retention; compaction prunes the expired ones). */
  get size(): number {
    return this.seen.size;
  }

  /**
   * Mark ids as taken. Returns false (and marks nothing) if any was already
   * taken, or if the claim could not be written: the caller must then drop
   * (or, with `tryClaim`, hold) the message. `at` (unix seconds, default now)
   * dates the entry: retention counts from it, so a request dated in the
   * future can be remembered until its own date has left the window.
   */
  claim(ids: readonly string[], at?: number): boolean {
    return this.tryClaim(ids, at) === 'claimed';
  }

  /**
   * `claimed`: taken now, written (durable once `synced()` resolves).
   * `duplicate`: an id was taken before. `unrecorded`: the log could not be
   * written (disk full, I/O error): nothing is taken, retry later.
   */
  tryClaim(ids: readonly string[], at?: number): ClaimResult {
    if (ids.some((id) => this.seen.has(id))) return 'duplicate';
    const t = Math.max(now(), at ?? 0);
    const text = (this.torn ? '\n' : '') + ids.map((id) => `${t} ${id}\n`).join('');
    // Written before the request runs: a crash mid-request loses the request
    // rather than running it twice (at-most-once).
    try {
      this.fd ??= openSync(this.file, 'a', 0o600);
      writeAllSync(this.fd, Buffer.from(text, 'utf8'));
    } catch (err) {
      this.torn = true;
      this.opts.onWriteError?.('append', err as NodeJS.ErrnoException);
      return 'unrecorded';
    }
    this.torn = false;
    this.written++;
    this.lines += ids.length;
    for (const id of ids) this.seen.set(id, t);
    if (this.lines > Math.max(this.compactAfterLines, 2 * this.linesAfterCompaction) && Date.now() - this.lastCompactAttempt >= (this.opts.compactIntervalMs ?? 60_000)) {
      this.compact();
    }
    return 'claimed';
  }

  /**
   * Resolves once every claim made so far is on stable storage. A failing
   * fdatasync is reported (onWriteError) and resolves anyway: the claim is in
   * memory and in the page cache, and holding every request on it would stop
   * intake for a fault only power loss turns into a duplicate.
   */
  synced(): Promise<void> {
    const target = this.written;
    if (this.syncedUpTo >= target) return Promise.resolve();
    const next = async (): Promise<void> => {
      while (this.syncing) await this.syncing;
      if (this.syncedUpTo >= target) return;
      const upTo = this.written;
      this.syncing = this.datasync().then(
        () => void (this.syncedUpTo = Math.max(this.syncedUpTo, upTo)),
        (err: NodeJS.ErrnoException) => {
          this.syncedUpTo = Math.max(this.syncedUpTo, upTo);
          this.opts.onWriteError?.('sync', err);
        },
      );
      try {
        await this.syncing;
      } finally {
        this.syncing = undefined;
      }
    };
    return next();
  }

  private async datasync(): Promise<void> {
    // A handle of its own on the file (by path: compaction renames a new file
    // into place, and the next sync must reach that one).
    this.syncHandle ??= open(this.file, 'r');
    const fh = await this.syncHandle;
    await fh.datasync();
  }

  /**
   * Rewrite the log with the live entries only (expired ones also leave
   * memory). On failure the old log stays in use; the next attempt is a
   * minute later at the earliest.
   */
  compact(): boolean {
    this.lastCompactAttempt = Date.now();
    const cutoff = now() - this.retentionSeconds;
    for (const [id, t] of this.seen) if (t < cutoff) this.seen.delete(id);
    try {
      writeFileAtomic(this.file, [...this.seen].map(([id, t]) => `${t} ${id}\n`).join(''));
    } catch (err) {
      this.opts.onWriteError?.('compact', err as NodeJS.ErrnoException);
      return false;
    }
    // The appends and syncs go to the new file from now on; the old one is
    // durable already (every claim in it was synced or is being synced).
    this.reopen();
    this.lines = this.linesAfterCompaction = this.seen.size;
    this.torn = false;
    return true;
  }

  private reopen(): void {
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
    const old = this.syncHandle;
    this.syncHandle = undefined;
    void old?.then((fh) => fh.close()).catch(() => undefined);
  }

  close(): void {
    this.reopen();
  }
}

function now(): number {
  return Math.floor(Date.now() / 1000);
}
