/**
 * Remembers which events and requests were already taken, across restarts, so
 * that re-reading the relays' two-day window after a restart (or the same
 * wrap arriving from three relays) never runs a request twice.
 *
 * Append-only log of `<unix seconds> <id>` lines; compacted at load time by
 * dropping entries older than the retention, which must exceed the
 * subscription's `since` window.
 */
import { appendFileSync, existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { writeFileAtomic } from '../util/atomic-file.js';

export class SeenStore {
  private readonly file: string;
  private readonly seen = new Map<string, number>();

  constructor(
    stateDir: string,
    private readonly retentionSeconds: number,
  ) {
    mkdirSync(stateDir, { recursive: true, mode: 0o700 });
    this.file = join(stateDir, 'seen.log');
    this.load();
  }

  private load(): void {
    if (existsSync(this.file)) {
      const cutoff = now() - this.retentionSeconds;
      for (const line of readFileSync(this.file, 'utf8').split('\n')) {
        const [ts, id] = line.split(' ');
        const t = Number(ts);
        if (id && Number.isFinite(t) && t >= cutoff) this.seen.set(id, t);
      }
    }
    writeFileAtomic(this.file, [...this.seen].map(([id, t]) => `${t} ${id}\n`).join(''));
  }

  has(id: string): boolean {
    return this.seen.has(id);
  }

  /**
   * Mark ids as taken. Returns false (and marks nothing) if any was already
   * taken: the caller must then drop the message. `at` (unix seconds, default
   * now) dates the entry: retention counts from it, so a request dated in the
   * future can be remembered until its own date has left the window.
   */
  claim(ids: readonly string[], at?: number): boolean {
    if (ids.some((id) => this.seen.has(id))) return false;
    const t = Math.max(now(), at ?? 0);
    for (const id of ids) this.seen.set(id, t);
    // Written before the request runs: a crash mid-request loses the request
    // rather than running it twice (at-most-once).
    appendFileSync(this.file, ids.map((id) => `${t} ${id}\n`).join(''), { mode: 0o600 });
    return true;
  }
}

function now(): number {
  return Math.floor(Date.now() / 1000);
}
