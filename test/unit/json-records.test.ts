import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { readJsonRecords, writeFileAtomic } from '../../src/util/atomic-file.js';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

describe('readJsonRecords', () => {
  it('parses every *.json, lists what does not parse, ignores other names and removes interrupted writes', () => {
    const dir = mkdtempSync(join(tmpdir(), 'pga-records-'));
    dirs.push(dir);
    writeFileAtomic(join(dir, 'a.json'), JSON.stringify({ n: 1 }));
    writeFileAtomic(join(dir, 'b.json'), JSON.stringify({ n: 2 }));
    writeFileSync(join(dir, 'torn.json'), '{"n":');
    writeFileSync(join(dir, 'wrong.json'), JSON.stringify({ n: 'x' }));
    writeFileSync(join(dir, '.a.json.0badc0de.tmp'), '{"n": 9}'); // a crash between write and rename
    writeFileSync(join(dir, 'notes.txt'), 'keep me');
    const parse = (j: unknown) => {
      const n = (j as { n?: unknown }).n;
      if (typeof n !== 'number') throw new Error('bad');
      return n;
    };
    const { records, broken } = readJsonRecords(dir, parse);
    expect(records.sort()).toEqual([1, 2]);
    expect(broken.sort()).toEqual([join(dir, 'torn.json'), join(dir, 'wrong.json')]);
    expect(existsSync(join(dir, '.a.json.0badc0de.tmp'))).toBe(false);
    expect(readdirSync(dir).sort()).toEqual(['a.json', 'b.json', 'notes.txt', 'torn.json', 'wrong.json']);
  });
});

describe('writeFileAtomic under a file-size limit (short writes)', () => {
  const child = new URL('../support/atomic-write-child.ts', import.meta.url).pathname;
  const tsx = new URL('../../node_modules/.bin/tsx', import.meta.url).pathname;

  it('never leaves a prefix of the new content: old file intact, no temp file, the failure reported', async () => {
    const { execa } = await import('execa');
    const dir = mkdtempSync(join(tmpdir(), 'pga-shortwrite-'));
    dirs.push(dir);
    const file = join(dir, 'seen.log');
    writeFileSync(file, 'old content\n');
    // 2 000 lines of ~76 bytes (~150 KB) under a 64 KiB limit: write(2) writes
    // what fits and returns a short count; node ignores SIGXFSZ, so the next
    // write fails with EFBIG instead of killing the process.
    const res = await execa('prlimit', ['--fsize=65536', tsx, child, file, '2000'], { reject: false });
    expect(res.exitCode).toBe(0);
    expect(res.stdout.trim()).toBe('EFBIG');
    expect(readFileSync(file, 'utf8')).toBe('old content\n');
    expect(readdirSync(dir)).toEqual(['seen.log']);
  });

  it('writes everything when it fits', async () => {
    const { execa } = await import('execa');
    const dir = mkdtempSync(join(tmpdir(), 'pga-shortwrite-'));
    dirs.push(dir);
    const file = join(dir, 'seen.log');
    const res = await execa('prlimit', ['--fsize=1048576', tsx, child, file, '2000'], { reject: false });
    expect(res.stdout.trim()).toBe('ok');
    expect(readFileSync(file, 'utf8').split('\n').filter(Boolean)).toHaveLength(2000);
  });
});
