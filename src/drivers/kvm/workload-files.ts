/**
 * Every file of a workload directory, named in one place (after Lima's
 * pkg/limatype/filenames): the argv builder, the driver, passt's launch and
 * the doctor find a workload's files through here. A new file is one more
 * entry in VM_FILES; one marked `socket` is covered by the sun_path check.
 */
import path from 'node:path';

/** sun_path is 108 bytes including the terminating NUL: the longest unix socket path. */
export const SUN_PATH_MAX = 107;

/** The longest workload id. The id names the directory, so it bounds every path below. */
export const MAX_ID_LENGTH = 40;
const ID_RE = new RegExp(`^[a-z0-9-]{1,${MAX_ID_LENGTH}}$`);

/** Whether `id` is a well-formed workload id (and so a safe single path component). */
export function isWorkloadId(id: string): boolean {
  return ID_RE.test(id);
}

/** Relative to the workload directory. */
export const VM_FILES = {
  /** The guest's disk: a qcow2 overlay backed by the base image. */
  disk: { name: 'disk.qcow2' },
  /** The NoCloud seed ISO; holds the root password's hash, never the password. */
  seed: { name: 'seed.iso' },
  /** qemu's pidfile; qemu removes it when it exits. */
  pidfile: { name: 'qemu.pid' },
  /** The console as far as the driver has drained qemu's ring into it, size-capped. */
  serialLog: { name: 'serial.log' },
  /** The driver's metadata (vm-meta.ts): name, port, slot, ready token. No secrets. */
  meta: { name: 'vm.json' },
  /** qemu's QMP control socket. */
  qmpSocket: { name: 'qmp.sock', socket: true },
  /** The unix socket qemu and passt talk over (passt mode). */
  passtSocket: { name: 'passt.sock', socket: true },
  passtPidfile: { name: 'passt.pid' },
  passtLog: { name: 'passt.log' },
  /** The qemu guest agent's channel of an idle warm-pool VM (warm-pool.ts); unlinked at its hand-off. */
  qgaSocket: { name: 'qga.sock', socket: true },
} as const satisfies Record<string, { name: string; socket?: true }>;

export type VmFileKey = keyof typeof VM_FILES;

export function vmFile(dir: string, file: VmFileKey): string {
  return path.join(dir, VM_FILES[file].name);
}

/** The directory of workload `id` under `vmRoot`. */
export function workloadDir(vmRoot: string, id: string): string {
  if (!isWorkloadId(id)) throw new RangeError('invalid workload id');
  return path.join(vmRoot, id);
}

/**
 * Throws unless every socket of every possible workload under `vmRoot` fits
 * in sun_path; the message names the longest vmRoot that would.
 */
export function assertSocketPathsFit(vmRoot: string): void {
  const longestDir = workloadDir(vmRoot, 'x'.repeat(MAX_ID_LENGTH));
  const longest = Math.max(
    ...Object.values(VM_FILES)
      .filter((f) => 'socket' in f && f.socket)
      .map((f) => Buffer.byteLength(path.join(longestDir, f.name))),
  );
  if (longest > SUN_PATH_MAX) {
    const room = SUN_PATH_MAX - (longest - Buffer.byteLength(vmRoot));
    throw new RangeError(`vmRoot is too long: its workloads' socket paths would exceed ${SUN_PATH_MAX} bytes (keep drivers.kvm.vmRoot at most ${room} bytes)`);
  }
}
