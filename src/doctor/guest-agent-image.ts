/**
 * Doctor check for the warm pool: does the configured guest image contain
 * the qemu guest agent? Pool VMs are handed to tenants through it; without
 * it they never become idle. Looked up without booting anything: the image
 * is converted to a sparse raw file in a temp folder, its partition table
 * read (partition-table.ts), and each filesystem asked with `debugfs`
 * (e2fsprogs). What this cannot see: filesystems other than ext2/3/4 (XFS,
 * btrfs), LVM, and whether the agent's unit is enabled; it says so.
 */
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { execa } from 'execa';
import type { KvmConfig } from '../config/schema.js';
import { filesystemOffsets, PARTITION_TABLE_BYTES } from './partition-table.js';
import type { CheckResult } from './report.js';

/** Where distributions install qemu-ga (Debian/Ubuntu, Fedora/RHEL). */
const QEMU_GA_PATHS = ['/usr/sbin/qemu-ga', '/usr/bin/qemu-ga'] as const;

const NAME = 'guest agent in image';
const FIX_INSTALL = 'install qemu-guest-agent into the image (docs/guest-images.md), or set the plans\' warmPool to 0';

/** Plans with a warm pool. `warmPool` is read defensively: plans without it (or with 0) have none. */
export function plansWithPool(plans: readonly object[]): string[] {
  return plans.flatMap((p) => {
    const { id, warmPool } = p as { id?: unknown; warmPool?: unknown };
    return typeof warmPool === 'number' && warmPool > 0 && typeof id === 'string' ? [id] : [];
  });
}

/** What `debugfs -R 'stat PATH'` said: the file is there, is not there, or the filesystem could not be read. */
export function debugfsFound(output: string): 'found' | 'absent' | 'unreadable' {
  if (/^Inode: \d+\s+Type: /m.test(output)) return 'found';
  if (/File not found by ext2_lookup/.test(output)) return 'absent';
  return 'unreadable';
}

/** No row when no plan has a warm pool. */
export async function checkGuestAgentImage(
  kvm: Pick<KvmConfig, 'baseImage' | 'baseImageFormat' | 'qemuImgBinary'>,
  plans: readonly object[],
  opts: { debugfsBinary?: string; timeoutMs?: number } = {},
): Promise<CheckResult | undefined> {
  const pooled = plansWithPool(plans);
  if (pooled.length === 0) return undefined;
  const debugfs = opts.debugfsBinary ?? 'debugfs';
  const needed = `needed by the warm pool of ${pooled.join(', ')}`;
  const probe = await execa(debugfs, ['-V'], { reject: false, stdin: 'ignore', timeout: 10_000 });
  if ((probe as { code?: string }).code === 'ENOENT') {
    return { name: NAME, status: 'warn', detail: `cannot look inside ${kvm.baseImage}: ${debugfs} not found (${needed})`, fix: 'apt-get install e2fsprogs, or make sure the image has qemu-guest-agent (docs/guest-images.md)' };
  }
  let tmp: string | undefined;
  try {
    tmp = await mkdtemp(path.join(tmpdir(), 'pga-doctor-image-'));
    const raw = path.join(tmp, 'image.raw');
    // Sparse: only the image's data takes space (a few hundred MB for a cloud image), for the seconds this check runs.
    const conv = await execa(kvm.qemuImgBinary, ['convert', '-f', kvm.baseImageFormat, '-O', 'raw', kvm.baseImage, raw], {
      reject: false, stdin: 'ignore', timeout: opts.timeoutMs ?? 300_000,
    });
    if (conv.exitCode !== 0) {
      return { name: NAME, status: 'warn', detail: `cannot read ${kvm.baseImage}: ${String(conv.stderr ?? conv.shortMessage).trim().split('\n')[0] ?? ''}`, fix: 'check the base image (see the base image row)' };
    }
    const head = Buffer.alloc(PARTITION_TABLE_BYTES);
    const fh = await open(raw, 'r');
    try {
      await fh.read(head, 0, head.length, 0);
    } finally {
      await fh.close();
    }
    let readable = 0;
    for (const offset of filesystemOffsets(head)) {
      for (const file of QEMU_GA_PATHS) {
        const r = await execa(debugfs, ['-R', `stat ${file}`, `${raw}?offset=${offset}`], { reject: false, stdin: 'ignore', all: true, timeout: 60_000 });
        const found = debugfsFound(String(r.all ?? ''));
        if (found === 'unreadable') break;
        if (found === 'found') {
          return { name: NAME, status: 'ok', detail: `${file} in ${kvm.baseImage}${offset ? ` (partition at ${offset / 1024 / 1024} MiB)` : ''}, ${needed}` };
        }
        if (file === QEMU_GA_PATHS[0]) readable++;
      }
    }
    if (readable > 0) {
      return { name: NAME, status: 'fail', detail: `${kvm.baseImage} has no qemu-ga (looked in ${QEMU_GA_PATHS.join(', ')}): pool VMs would never become idle (${needed})`, fix: FIX_INSTALL };
    }
    return {
      name: NAME,
      status: 'warn',
      detail: `cannot look inside ${kvm.baseImage}: no ext2/3/4 filesystem found (XFS, btrfs and LVM cannot be read here); ${needed}`,
      fix: 'make sure the image has qemu-guest-agent (docs/guest-images.md): pool VMs whose agent never answers are replaced, never handed out',
    };
  } catch (err) {
    return { name: NAME, status: 'warn', detail: `cannot look inside ${kvm.baseImage}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, fix: 'make sure there is room in the temp folder, or check the image by hand (docs/guest-images.md)' };
  } finally {
    if (tmp) await rm(tmp, { recursive: true, force: true });
  }
}
