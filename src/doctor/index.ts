/**
 * `paygress-agent doctor` and the blocking checks `run` does at start: runs
 * the checks for a loaded config, in a fixed order, and returns the rows.
 */
import type { Config } from '../config/schema.js';
import { checkAccel, checkBaseImage, checkDiskSpace, checkKeyFile, checkPorts, checkPublicHost, checkRelays, checkTools, checkWritableDir } from './checks.js';
import type { CheckResult } from './report.js';
import { checkPasst, networkModeRow, netStatusRows } from '../hostnet/checks.js';
import { checkGuestAgentImage } from './guest-agent-image.js';
import { tapNetworkOf } from '../drivers/kvm/config.js';

export { hasBlocker, renderTable, type CheckResult, type CheckStatus } from './report.js';

export interface DoctorOptions {
  /** `doctor`: everything. `run`: no relay probes (relays may be down; the pool retries) and no kvm probe unless accel is kvm. */
  mode: 'doctor' | 'run';
  /** /dev/kvm unless a test says otherwise. */
  kvmDevice?: string;
  relayTimeoutMs?: number;
}

export async function runChecks(cfg: Config, opts: DoctorOptions): Promise<CheckResult[]> {
  const kvm = cfg.drivers.kvm;
  const rows: CheckResult[] = [];
  const doctor = opts.mode === 'doctor';
  // Relays are slow when down; start them first so they overlap the rest.
  const relays = doctor ? checkRelays(cfg.relays, opts.relayTimeoutMs) : undefined;
  if (kvm) {
    rows.push(await checkAccel(kvm, { device: opts.kvmDevice, probeUnused: doctor }));
    rows.push(...(await checkTools(kvm)));
    rows.push(...(await checkBaseImage(kvm)));
    // Seconds of qemu-img convert: only when asked, not at every start.
    const guestAgent = doctor ? await checkGuestAgentImage(kvm, cfg.plans) : undefined;
    if (guestAgent) rows.push(guestAgent);
  }
  rows.push(await checkKeyFile(cfg.provider.keyFile));
  rows.push(await checkWritableDir('state dir', 'stateDir', cfg.stateDir));
  if (kvm) {
    rows.push(await checkWritableDir('vm dir', 'drivers.kvm.vmRoot', kvm.vmRoot));
    rows.push(await checkWritableDir('overlay cache', 'drivers.kvm.overlayTemplateDir', kvm.overlayTemplateDir));
    rows.push(await checkDiskSpace(kvm.vmRoot, cfg.limits.diskReserveGb, cfg.plans));
    // Tap slot ports are DNAT'ed by nftables: nothing binds them.
    if (kvm.network !== 'tap') rows.push(await checkPorts(kvm));
    if (kvm.network === 'tap') rows.push(...(await netStatusRows(tapNetworkOf(kvm))));
    else if (kvm.network === 'passt') rows.push(await checkPasst(kvm.passtBinary));
    else rows.push(networkModeRow(kvm.network)!);
  }
  rows.push(checkPublicHost(cfg.provider.publicHost, kvm?.bindAddress));
  if (relays) rows.push(...(await relays));
  return rows;
}
