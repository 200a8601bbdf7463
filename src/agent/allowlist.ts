/**
 * The allowlist of `admission.mode: allowlist`: keys from the config plus a
 * file the operator edits (one npub or hex key per line, `#` comments). The
 * file is looked at (one stat) on each check and re-read when it changed, so
 * adding a key needs no restart. A file that cannot be read or holds a bad
 * line keeps the last good list: a typo must not open the door or lock
 * everyone out.
 */
import { readFileSync, statSync } from 'node:fs';
import { parsePublicKey } from '../nostr/keys.js';
import type { Logger } from '../util/logger.js';

/** Keys of an allowlist file's text, or the line numbers that are not keys. Pure; never echoes a line. */
export function parseAllowlist(text: string): { ok: true; keys: string[] } | { ok: false; badLines: number[] } {
  const keys: string[] = [];
  const badLines: number[] = [];
  text.split('\n').forEach((raw, i) => {
    const line = raw.replace(/#.*/, '').trim();
    if (!line) return;
    try {
      keys.push(parsePublicKey(line));
    } catch {
      badLines.push(i + 1);
    }
  });
  return badLines.length ? { ok: false, badLines } : { ok: true, keys };
}

export class Allowlist {
  private readonly fixed: ReadonlySet<string>;
  private fromFile: ReadonlySet<string> = new Set();
  private fileStamp = '';

  constructor(
    configKeys: readonly string[],
    private readonly file: string | undefined,
    private readonly log: Logger,
  ) {
    this.fixed = new Set(configKeys.map((k) => parsePublicKey(k)));
    this.refresh();
  }

  has(pubkey: string): boolean {
    this.refresh();
    return this.fixed.has(pubkey) || this.fromFile.has(pubkey);
  }

  private refresh(): void {
    if (!this.file) return;
    let stamp: string;
    try {
      const st = statSync(this.file);
      stamp = `${st.mtimeMs}:${st.size}:${st.ino}`;
    } catch (err) {
      stamp = 'missing';
      if (stamp !== this.fileStamp) this.log.warn({ file: this.file, err: (err as Error).message }, 'allowlist file unreadable; keeping the last good list');
      this.fileStamp = stamp;
      return;
    }
    if (stamp === this.fileStamp) return;
    this.fileStamp = stamp;
    let parsed: ReturnType<typeof parseAllowlist>;
    try {
      parsed = parseAllowlist(readFileSync(this.file, 'utf8'));
    } catch (err) {
      this.log.warn({ file: this.file, err: (err as Error).message }, 'allowlist file unreadable; keeping the last good list');
      return;
    }
    if (!parsed.ok) {
      this.log.warn({ file: this.file, badLines: parsed.badLines }, 'allowlist file has lines that are not keys; keeping the last good list');
      return;
    }
    this.fromFile = new Set(parsed.keys);
    this.log.info({ file: this.file, keys: this.fromFile.size }, 'allowlist loaded');
  }
}
