import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { generateSecretKey, getPublicKey } from 'nostr-tools';
import { npubEncode } from 'nostr-tools/nip19';
import { Allowlist, parseAllowlist } from '../../src/agent/allowlist.js';
import { silentLogger } from '../../src/util/logger.js';

const key = () => getPublicKey(generateSecretKey());

describe('allowlist', () => {
  it('parses npubs and hex keys, comments and blank lines; names bad lines without echoing them', () => {
    const a = key();
    const b = key();
    expect(parseAllowlist(`# team\n${npubEncode(a)}\n\n${b.toUpperCase()}  # bob\n`)).toEqual({ ok: true, keys: [a, b] });
    const bad = parseAllowlist(`${a}\nnsec1secretish\n`);
    expect(bad).toEqual({ ok: false, badLines: [2] });
  });

  it('admits config keys and file keys, picks up file edits without a restart, keeps the last good list on a bad edit', () => {
    const dir = mkdtempSync(join(tmpdir(), 'pga-allow-'));
    const file = join(dir, 'allowlist');
    const [fromConfig, first, second, stranger] = [key(), key(), key(), key()];
    writeFileSync(file, `${first}\n`);
    const list = new Allowlist([npubEncode(fromConfig)], file, silentLogger);
    expect([fromConfig, first, second, stranger].map((k) => list.has(k))).toEqual([true, true, false, false]);

    writeFileSync(file, `${first}\n${second}\n# grown\n`);
    expect(list.has(second)).toBe(true);

    writeFileSync(file, `${second}\nnot a key at all, oops\n`);
    expect([first, second].map((k) => list.has(k))).toEqual([true, true]);

    rmSync(file);
    expect(list.has(first)).toBe(true);
    expect(list.has(stranger)).toBe(false);
  });
});
