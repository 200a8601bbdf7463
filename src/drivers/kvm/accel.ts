import { constants } from 'node:fs';
import { open } from 'node:fs/promises';
import type { Logger } from '../../util/logger.js';
import type { KvmDriverConfig } from './config.js';

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

/** `auto` → kvm if usable, else tcg with a warning (TCG guests are many times slower). */
export async function resolveAccel(
  accel: KvmDriverConfig['accel'],
  logger: Logger,
  device = '/dev/kvm',
): Promise<'kvm' | 'tcg'> {
  if (accel !== 'auto') return accel;
  if (await kvmUsable(device)) return 'kvm';
  logger.warn({ device }, 'kvm not usable, falling back to tcg (software emulation, slow guests)');
  return 'tcg';
}
