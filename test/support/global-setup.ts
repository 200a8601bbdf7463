/**
 * Build the guest images once, before any test file starts, so no test's
 * timeout has to absorb a first-time image build (cached afterwards in
 * ~/.cache/paygress-agent/guests).
 */
import { ensureCloudGuest } from './cloud-guest.js';
import { ensureTinyGuest } from './tiny-guest.js';

export default async function setup(): Promise<void> {
  await ensureTinyGuest();
  await ensureCloudGuest();
}
