/**
 * Where a disk image's filesystems may start, read from its first bytes:
 * the partitions of an MBR or GPT table, or the whole disk when it has no
 * table (as the cloud test guest: one ext4 filling the disk). Pure and
 * total: a malformed table gives fewer candidates, never a throw.
 */

const SECTOR = 512;
/** Bytes a caller reads from the start of the image: MBR, GPT header and a standard 128-entry array. */
export const PARTITION_TABLE_BYTES = 34 * SECTOR;
const GPT_PROTECTIVE = 0xee;
const MBR_EXTENDED = new Set([0x05, 0x0f, 0x85]);
const MAX_GPT_ENTRIES = 128;

/** Byte offsets of the filesystems worth looking into, in table order; `[0]` when the image has no partition table. */
export function filesystemOffsets(head: Buffer): number[] {
  if (head.length < SECTOR || head.readUInt16LE(510) !== 0xaa55) return [0];
  const mbr: { type: number; lba: number }[] = [];
  for (let i = 0; i < 4; i++) {
    const at = 446 + 16 * i;
    const type = head[at + 4]!;
    const lba = head.readUInt32LE(at + 8);
    const sectors = head.readUInt32LE(at + 12);
    if (type !== 0 && lba > 0 && sectors > 0) mbr.push({ type, lba });
  }
  // A boot sector with the signature but no entries: a filesystem on the whole disk (e.g. FAT).
  if (mbr.length === 0) return [0];
  if (mbr.some((p) => p.type === GPT_PROTECTIVE)) return gptOffsets(head);
  return mbr.filter((p) => !MBR_EXTENDED.has(p.type)).map((p) => p.lba * SECTOR);
}

function gptOffsets(head: Buffer): number[] {
  const hdr = SECTOR;
  if (head.length < hdr + 92 || head.toString('latin1', hdr, hdr + 8) !== 'EFI PART') return [];
  const entriesLba = Number(head.readBigUInt64LE(hdr + 72));
  const count = head.readUInt32LE(hdr + 80);
  const size = head.readUInt32LE(hdr + 84);
  if (size < 128 || size % 8 !== 0 || !Number.isSafeInteger(entriesLba)) return [];
  const out: number[] = [];
  for (let i = 0; i < Math.min(count, MAX_GPT_ENTRIES); i++) {
    const at = entriesLba * SECTOR + i * size;
    if (at + 48 > head.length) break;
    const typeGuid = head.subarray(at, at + 16);
    if (typeGuid.every((b) => b === 0)) continue;
    const first = Number(head.readBigUInt64LE(at + 32));
    if (first > 0 && Number.isSafeInteger(first * SECTOR)) out.push(first * SECTOR);
  }
  return out;
}
