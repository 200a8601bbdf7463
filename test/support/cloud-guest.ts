/**
 * The "cloud" test guest: Debian bookworm with real cloud-init 22.4,
 * openssh-server and qemu-guest-agent (for the warm pool), booted with
 * -kernel/-initrd (see scripts/build-cloud-guest.sh and docs/guest-images.md). Built once into the user cache, outside the repo.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { finalMessageFor } from '../../src/drivers/kvm/cloud-config.js';
import type { KvmDriver } from '../../src/drivers/kvm/driver.js';
import { ensureGuest, guestBuildScript, guestDir, nonEmptyFile } from './guest-cache.js';

export interface CloudGuest {
  /** Folder holding the outputs. */
  dir: string;
  /** Kernel for qemu -kernel. */
  kernel: string;
  /** Initrd for qemu -initrd (Debian builds virtio_blk as a module: required). */
  initrd: string;
  /** Compressed qcow2 root filesystem; use it as a read-only backing file of a per-VM overlay. */
  baseImage: string;
  /** Kernel command line for qemu -append (the contents of `appendFile`). */
  append: string;
  /** The file the build script writes the kernel command line to. */
  appendFile: string;
}

/** What the build script writes into `append`; used until the file exists. */
export const DEFAULT_CLOUD_GUEST_APPEND = 'root=LABEL=rootfs rw console=ttyS0';

export const CLOUD_GUEST_BUILD_SCRIPT = guestBuildScript('cloud');
/** GUEST_VERSION in scripts/build-cloud-guest.sh: an older cached build is rebuilt. */
export const CLOUD_GUEST_VERSION = '2';

/** Where the guest lives; the same rule as the build script (PAYGRESS_CACHE_DIR or ~/.cache/paygress-agent). */
export function cloudGuestPaths(env: NodeJS.ProcessEnv = process.env): CloudGuest {
  // Versioned, as in the build script: checkouts expecting other versions share the cache.
  const dir = `${guestDir('cloud', env)}-v${CLOUD_GUEST_VERSION}`;
  const appendFile = join(dir, 'append');
  const append = existsSync(appendFile) ? readFileSync(appendFile, 'utf8').trim() : DEFAULT_CLOUD_GUEST_APPEND;
  return {
    dir,
    kernel: join(dir, 'vmlinuz'),
    initrd: join(dir, 'initrd.img'),
    baseImage: join(dir, 'base.qcow2'),
    append,
    appendFile,
  };
}

/** True when every output the build script makes is present. */
export function cloudGuestBuilt(paths: CloudGuest = cloudGuestPaths()): boolean {
  let version = '';
  try {
    version = readFileSync(join(paths.dir, 'version'), 'utf8').trim();
  } catch {
    return false;
  }
  return version === CLOUD_GUEST_VERSION && [paths.kernel, paths.initrd, paths.baseImage, paths.appendFile].every(nonEmptyFile);
}

/**
 * The guest's paths, building it first if any output is missing. A build runs
 * mmdebstrap against the Debian mirror (about 100 s here, needs root); its
 * progress goes to our stderr so a slow first run is visibly not a hang.
 */
export function ensureCloudGuest(): Promise<CloudGuest> {
  return ensureGuest({ script: CLOUD_GUEST_BUILD_SCRIPT, paths: () => cloudGuestPaths(), built: cloudGuestBuilt, timeoutMs: 20 * 60_000 });
}

/**
 * Whether cloud-init has printed this workload's final message on its serial
 * console: the point where the root password is set and sshd configured (an
 * SSH banner alone comes earlier).
 */
export async function cloudInitFinished(driver: KvmDriver, id: string): Promise<boolean> {
  const meta = await driver.readMeta(id);
  return meta !== undefined && (await driver.readConsole(id)).includes(finalMessageFor(meta.readyToken));
}
