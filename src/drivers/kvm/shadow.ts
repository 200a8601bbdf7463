/**
 * Pure edit of a guest's /etc/shadow: root's password field replaced by a
 * SHA-512 crypt hash, the rest of the file kept byte for byte. The hand-off
 * writes the file through the guest agent instead of having qemu-ga spawn
 * `chpasswd -e` (guest-set-user-password), several times slower
 * (docs/guest-images.md).
 *
 * Total: anything but a file of shadow(5) lines with exactly one `root`
 * entry gives `undefined`; the text comes from the guest.
 */
import { SHA512_CRYPT_RE } from './cloud-config.js';

/** shadow(5): name, password, lastchg, min, max, warn, inactive, expire, reserved. */
const SHADOW_FIELDS = 9;

/**
 * `shadow` with root's password set to `hash` and its last-change day set to
 * `today` (days since 1970-01-01), as chpasswd does: a last change of 0 would
 * force a password change at the first login, which a non-interactive SSH
 * login cannot do.
 */
export function withRootPasswordHash(shadow: string, hash: string, today: number): string | undefined {
  if (!SHA512_CRYPT_RE.test(hash)) throw new RangeError('hash must be a SHA-512 crypt hash');
  if (!Number.isSafeInteger(today) || today <= 0) throw new RangeError('today must be a positive day number');
  // eslint-disable-next-line no-control-regex
  if (!shadow.endsWith('\n') || /[\x00-\x09\x0b-\x1f\x7f]/.test(shadow)) return undefined;
  const lines = shadow.slice(0, -1).split('\n');
  let rootAt = -1;
  for (let i = 0; i < lines.length; i++) {
    const fields = lines[i]!.split(':');
    if (fields.length !== SHADOW_FIELDS || fields[0] === '') return undefined;
    if (fields[0] === 'root') {
      if (rootAt >= 0) return undefined;
      rootAt = i;
    }
  }
  if (rootAt < 0) return undefined;
  const root = lines[rootAt]!.split(':');
  root[1] = hash;
  root[2] = String(today);
  lines[rootAt] = root.join(':');
  return `${lines.join('\n')}\n`;
}

/** Days since the epoch, shadow(5)'s unit for dates. */
export function shadowDay(nowMs: number): number {
  return Math.floor(nowMs / 86_400_000);
}
