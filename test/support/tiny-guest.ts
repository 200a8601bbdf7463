/**
 * The tiny test guest: a Debian cloud kernel plus a busybox initramfs that
 * answers on port 22 with `SSH-2.0-paygress-tiny` (see
 * scripts/build-tiny-guest.sh). Boots in seconds under TCG; it proves "qemu
 * booted a guest and hostfwd reaches it", not SSH login. Built once into the
 * user cache, outside the repo.
 */
import { readFileSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import type { KvmDriverConfig } from '../../src/drivers/kvm/config.js';

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
export const TINY_GUEST_VERSION = '2';

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const TINY_GUEST_BUILD_SCRIPT = join(REPO_ROOT, 'scripts', 'build-tiny-guest.sh');

/** Where the guest lives; the same rule as the build script (PAYGRESS_CACHE_DIR or ~/.cache/paygress-agent). */
export function tinyGuestPaths(env: NodeJS.ProcessEnv = process.env): TinyGuest {
  const cache = env.PAYGRESS_CACHE_DIR || join(env.HOME || homedir(), '.cache', 'paygress-agent');
  const dir = join(cache, 'guests', 'tiny');
  return {
    dir,
    kernel: join(dir, 'vmlinuz'),
    initrd: join(dir, 'initrd.img'),
    baseImage: join(dir, 'base.qcow2'),
    append: TINY_GUEST_APPEND,
    readiness: 'ssh-banner',
  };
}

function nonEmptyFile(path: string): boolean {
  try {
    return statSync(path).size > 0;
  } catch {
    return false;
  }
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
export async function ensureTinyGuest(): Promise<TinyGuest> {
  const before = tinyGuestPaths();
  if (tinyGuestBuilt(before)) return before;
  await execa('bash', [TINY_GUEST_BUILD_SCRIPT], {
    stdin: 'ignore',
    stdout: 'ignore',
    stderr: 'inherit',
    timeout: 10 * 60_000,
  });
  const after = tinyGuestPaths();
  if (!tinyGuestBuilt(after)) throw new Error(`${TINY_GUEST_BUILD_SCRIPT} finished but outputs are missing in ${after.dir}`);
  return after;
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
