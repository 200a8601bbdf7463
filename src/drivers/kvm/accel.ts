import { constants } from 'node:fs';
import { open } from 'node:fs/promises';
import type { Logger } from '../../util/logger.js';
import type { KvmDriverConfig } from './config.js';
import { probeGuest } from './kvm-probe.js';

/** True when /dev/kvm (or `device`) can be opened read-write, which is what qemu needs for -accel kvm. */
export async function kvmUsable(device = '/dev/kvm'): Promise<boolean> {
  try {
    const fh = await open(device, constants.O_RDWR);
    await fh.close();
    return true;
  } catch {
    return false;
  }
}

/**
 * `auto` → kvm if usable, else tcg with a warning (TCG guests are many times slower).
 * With `qemuBinary`, "usable" also means a test guest really boots under kvm
 * (see kvm-probe.ts): a /dev/kvm that opens but hangs guests must not win.
 */
export async function resolveAccel(
  accel: KvmDriverConfig['accel'],
  logger: Logger,
  device = '/dev/kvm',
  qemuBinary?: string,
): Promise<'kvm' | 'tcg'> {
  if (accel !== 'auto') return accel;
  if (!(await kvmUsable(device))) {
    logger.warn({ device }, 'kvm not usable, falling back to tcg (software emulation, slow guests)');
    return 'tcg';
  }
  if (qemuBinary === undefined) return 'kvm';
  const probe = await probeGuest({ qemuBinary, accel: 'kvm' });
  if (probe.ok) return 'kvm';
  logger.warn({ device, detail: probe.detail }, 'kvm present but a test guest does not boot under it; falling back to tcg (slow guests)');
  return 'tcg';
}
