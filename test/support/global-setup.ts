/**
 * Build the guest images once, before any test file starts, so no test's
 * timeout has to absorb a first-time image build (cached afterwards in
 * ~/.cache/paygress-agent/guests).
 */
import { ensureCloudGuest } from './cloud-guest.js';
import { ensureSystemdRoot } from './systemd-root.js';
import { ensureTinyGuest } from './tiny-guest.js';

export default async function setup(): Promise<void> {
  await ensureTinyGuest();
  await ensureCloudGuest();
  // The Debian root the real-systemd test boots with systemd-nspawn.
  await ensureSystemdRoot();
}
