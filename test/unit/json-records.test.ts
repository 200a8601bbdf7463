import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
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
