import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
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
  const root = new URL('../..', import.meta.url).pathname;
  let dir: string;
  let exitCode: number | undefined;
  let answers: string[];

  // One child under a 64 KiB limit makes both writes: one too big for it over an old file, one that fits in a new file.
  beforeAll(async () => {
    const { execa } = await import('execa');
    dir = mkdtempSync(join(tmpdir(), 'pga-shortwrite-'));
    mkdirSync(join(dir, 'big'));
    mkdirSync(join(dir, 'fits'));
    writeFileSync(join(dir, 'big', 'seen.log'), 'old content\n');
    // 2 000 lines of ~76 bytes (~150 KB) under a 64 KiB limit: write(2) writes
    // what fits and returns a short count; node ignores SIGXFSZ, so the next
    // write fails with EFBIG instead of killing the process. 500 lines (~38 KB) fit.
    const res = await execa('prlimit', ['--fsize=65536', process.execPath, '--import', 'tsx', child, join(dir, 'big', 'seen.log'), '2000', join(dir, 'fits', 'seen.log'), '500'], { cwd: root, reject: false });
    exitCode = res.exitCode;
    answers = res.stdout.trim().split('\n');
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('never leaves a prefix of the new content: old file intact, no temp file, the failure reported', () => {
    expect(exitCode).toBe(0);
    expect(answers[0]).toBe('EFBIG');
    expect(readFileSync(join(dir, 'big', 'seen.log'), 'utf8')).toBe('old content\n');
    expect(readdirSync(join(dir, 'big'))).toEqual(['seen.log']);
  });

  it('writes everything when it fits', () => {
    expect(answers[1]).toBe('ok');
    expect(readFileSync(join(dir, 'fits', 'seen.log'), 'utf8').split('\n').filter(Boolean)).toHaveLength(500);
    expect(readdirSync(join(dir, 'fits'))).toEqual(['seen.log']);
  });
});
