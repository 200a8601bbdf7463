/**
 * The tiny test guest: a Debian cloud kernel plus a busybox initramfs that
 * answers on port 22 with `SSH-2.0-paygress-tiny` (see
 * scripts/build-tiny-guest.sh). Boots in seconds under TCG; it proves "qemu
 * booted a guest and hostfwd reaches it", not SSH login. Built once into the
 * user cache, outside the repo.
 */
import { readFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import type { KvmDriverConfig } from '../../src/drivers/kvm/config.js';
import { ensureGuest, guestBuildScript, guestDir, nonEmptyFile } from './guest-cache.js';

export interface TinyGuest {
  dir: string;
  kernel: string;
  initrd: string;
  /** Empty 1G qcow2: something for per-VM overlays to back onto. */
  baseImage: string;
  /** Kernel command line: the guest prints its marker and nothing else much on ttyS0. */
  append: string;
  /** No cloud-init in this guest: its fake sshd banner is the whole readiness signal. */
  readiness: 'ssh-banner';
}

/** What the guest's /init prints on the serial console once its network and fake sshd are up. */
export const TINY_GUEST_MARKER = 'paygress-tiny-guest: up';
/** The first line the fake sshd sends. */
export const TINY_GUEST_BANNER = 'SSH-2.0-paygress-tiny';
export const TINY_GUEST_APPEND = 'console=ttyS0 quiet';
/** GUEST_VERSION in scripts/build-tiny-guest.sh: an older cached build is rebuilt. */
export const TINY_GUEST_VERSION = '3';

export const TINY_GUEST_BUILD_SCRIPT = guestBuildScript('tiny');

/** Where the guest lives; the same rule as the build script (PAYGRESS_CACHE_DIR or ~/.cache/paygress-agent). */
export function tinyGuestPaths(env: NodeJS.ProcessEnv = process.env): TinyGuest {
  // Versioned, as in the build script: checkouts expecting other versions share the cache.
  const dir = `${guestDir('tiny', env)}-v${TINY_GUEST_VERSION}`;
  return {
    dir,
    kernel: join(dir, 'vmlinuz'),
    initrd: join(dir, 'initrd.img'),
    baseImage: join(dir, 'base.qcow2'),
    append: TINY_GUEST_APPEND,
    readiness: 'ssh-banner',
  };
}

export function tinyGuestBuilt(paths: TinyGuest = tinyGuestPaths()): boolean {
  let version = '';
  try {
    version = readFileSync(join(paths.dir, 'version'), 'utf8').trim();
  } catch {
    return false;
  }
  return version === TINY_GUEST_VERSION && [paths.kernel, paths.initrd, paths.baseImage].every(nonEmptyFile);
}

/** The guest's paths, building it first (apt-get download + cpio, a few seconds) if any output is missing. */
export function ensureTinyGuest(): Promise<TinyGuest> {
  return ensureGuest({ script: TINY_GUEST_BUILD_SCRIPT, paths: () => tinyGuestPaths(), built: tinyGuestBuilt, timeoutMs: 10 * 60_000 });
}

/**
 * A KVM driver config that boots the tiny guest under TCG with its SSH port on
 * loopback: what driver-level tests share; each names its own folder, ports
 * and qemu name prefix (so a test's cleanup never touches another's VMs).
 */
export function tinyDriverConfig(
  guest: TinyGuest,
  own: Pick<KvmDriverConfig, 'vmRoot' | 'portRange' | 'namePrefix'> & Partial<KvmDriverConfig>,
): KvmDriverConfig {
  return {
    qemuBinary: 'qemu-system-x86_64',
    qemuImgBinary: 'qemu-img',
    isoTool: 'genisoimage',
    accel: 'tcg',
    baseImage: guest.baseImage,
    baseImageFormat: 'qcow2',
    kernel: guest.kernel,
    initrd: guest.initrd,
    append: guest.append,
    bindAddress: '127.0.0.1',
    pidfileTimeoutMs: 15_000,
    stopTimeoutMs: 5_000,
    readiness: guest.readiness,
    // Beside the VM root, not in it: tests expect an empty VM root after stops.
    overlayTemplateDir: join(dirname(own.vmRoot), `${basename(own.vmRoot)}-overlay-templates`),
    ...own,
  };
}
