import { describe, expect, it } from 'vitest';
import { filesystemOffsets } from '../../src/doctor/partition-table.js';
import { debugfsFound, plansWithPool } from '../../src/doctor/guest-agent-image.js';
import { gptHead, mbrHead } from '../support/disk-images.js';

describe('filesystemOffsets', () => {
  it('no partition table: the whole disk', () => {
    expect(filesystemOffsets(Buffer.alloc(34 * 512))).toEqual([0]);
    expect(filesystemOffsets(Buffer.alloc(10))).toEqual([0]);
  });

  it('MBR: each primary partition, extended ones skipped', () => {
    expect(filesystemOffsets(mbrHead(2048, 100_000))).toEqual([2048 * 512]);
    const ext = mbrHead(2048, 100_000);
    ext[446 + 16 + 4] = 0x05;
    ext.writeUInt32LE(200_000, 446 + 16 + 8);
    ext.writeUInt32LE(10, 446 + 16 + 12);
    expect(filesystemOffsets(ext)).toEqual([2048 * 512]);
  });

  it('GPT behind a protective MBR: every used entry, in table order', () => {
    expect(filesystemOffsets(gptHead([2048, 262_144]))).toEqual([2048 * 512, 262_144 * 512]);
  });

  it('a broken GPT gives no candidates, never a throw', () => {
    const noHeader = gptHead([2048]);
    noHeader.write('XXXXXXXX', 512, 'latin1');
    expect(filesystemOffsets(noHeader)).toEqual([]);
    const badSize = gptHead([2048]);
    badSize.writeUInt32LE(3, 512 + 84);
    expect(filesystemOffsets(badSize)).toEqual([]);
    const farEntries = gptHead([2048]);
    farEntries.writeBigUInt64LE(2n ** 60n, 512 + 72);
    expect(filesystemOffsets(farEntries)).toEqual([]);
    // Entries beyond the bytes read are not invented.
    expect(filesystemOffsets(gptHead([2048]).subarray(0, 1024 + 20))).toEqual([]);
  });
});

describe('the warm-pool image check, pure parts', () => {
  it('plans with warmPool > 0, read defensively', () => {
    expect(plansWithPool([{ id: 'a' }, { id: 'b', warmPool: 0 }, { id: 'c', warmPool: 2 }, { id: 'd', warmPool: '3' }, { warmPool: 1 }])).toEqual(['c']);
  });

  it("classifies debugfs's answers", () => {
    expect(debugfsFound('debugfs 1.47.0 (5-Feb-2023)\nInode: 8261   Type: regular    Mode:  0755   Flags: 0x80000\n')).toBe('found');
    expect(debugfsFound('debugfs 1.47.0 (5-Feb-2023)\n/usr/sbin/qemu-ga: File not found by ext2_lookup \n')).toBe('absent');
    expect(debugfsFound('debugfs: Bad magic number in super-block while trying to open x\nstat: Filesystem not open\n')).toBe('unreadable');
    expect(debugfsFound('')).toBe('unreadable');
  });
});
