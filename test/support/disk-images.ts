/**
 * Partition tables written by hand, for tests of code that reads them: an
 * MBR with one Linux partition, or a protective MBR + GPT with an EFI system
 * partition before a Linux one (the layout of Debian's and Ubuntu's cloud images).
 */
const SECTOR = 512;

/** The first `bytes` of a disk whose single MBR partition (type 0x83) starts at `startLba`. */
export function mbrHead(startLba: number, sectors: number, bytes = 34 * SECTOR): Buffer {
  const b = Buffer.alloc(bytes);
  const at = 446;
  b[at + 4] = 0x83;
  b.writeUInt32LE(startLba, at + 8);
  b.writeUInt32LE(sectors, at + 12);
  b.writeUInt16LE(0xaa55, 510);
  return b;
}

/** A protective MBR and a GPT (entries at LBA 2) with partitions starting at `startLbas`, in that order. */
export function gptHead(startLbas: number[], bytes = 34 * SECTOR): Buffer {
  const b = Buffer.alloc(bytes);
  b[446 + 4] = 0xee;
  b.writeUInt32LE(1, 446 + 8);
  b.writeUInt32LE(0xffffffff, 446 + 12);
  b.writeUInt16LE(0xaa55, 510);
  b.write('EFI PART', SECTOR, 'latin1');
  b.writeBigUInt64LE(2n, SECTOR + 72);
  b.writeUInt32LE(128, SECTOR + 80);
  b.writeUInt32LE(128, SECTOR + 84);
  startLbas.forEach((lba, i) => {
    const at = 2 * SECTOR + i * 128;
    b.fill(0x11 + i, at, at + 16); // any non-zero type GUID
    b.writeBigUInt64LE(BigInt(lba), at + 32);
    b.writeBigUInt64LE(BigInt(lba + 2047), at + 40);
  });
  return b;
}
