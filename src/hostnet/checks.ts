/**
 * Doctor rows for the guest network: the tap setup (taps, owner, addresses,
 * forwarding, the nftables table) and the honesty of the other modes. Every
 * problem row carries the fix. `netStateRows` is pure.
 */
import { execa } from 'execa';
import type { CheckResult } from '../doctor/report.js';
import { NFT_FAMILY, NFT_TABLE } from './ruleset.js';
import { inspectNet, type NetState } from './setup.js';
import type { TapNetworkConfig } from './plan.js';

const SETUP_FIX = 'run the install-time setup as root: systemctl restart paygress-agent-net (or paygress-agent net up --config …)';

export function netStateRows(state: NetState, plan: TapNetworkConfig): CheckResult[] {
  const rows: CheckResult[] = [];
  rows.push(
    state.userUid === undefined
      ? { name: 'tap user', status: 'fail', detail: `user ${plan.user} (drivers.kvm.tap.user) does not exist`, fix: `create the service user (systemd-sysusers) or set drivers.kvm.tap.user` }
      : { name: 'tap user', status: 'ok', detail: `${plan.user} (uid ${state.userUid}) owns the taps` },
  );
  const missing = state.taps.filter((t) => !t.exists).map((t) => t.slot.tap);
  const wrongOwner = state.taps.filter((t) => t.exists && state.userUid !== undefined && t.ownerUid !== state.userUid).map((t) => t.slot.tap);
  const wrongAddress = state.taps
    .filter((t) => t.exists && (t.addresses.length !== 1 || t.addresses[0] !== `${t.slot.hostAddress}/${t.slot.prefixLength}`))
    .map((t) => t.slot.tap);
  const down = state.taps.filter((t) => t.exists && !t.up).map((t) => t.slot.tap);
  const list = (names: string[]) => (names.length > 4 ? `${names.slice(0, 4).join(', ')} and ${names.length - 4} more` : names.join(', '));
  if (missing.length > 0) rows.push({ name: 'taps', status: 'fail', detail: `${missing.length} of ${plan.slots} taps missing: ${list(missing)}`, fix: SETUP_FIX });
  else if (wrongOwner.length > 0) rows.push({ name: 'taps', status: 'fail', detail: `not owned by ${plan.user}: ${list(wrongOwner)} (qemu could not open them)`, fix: SETUP_FIX });
  else if (wrongAddress.length > 0) rows.push({ name: 'taps', status: 'fail', detail: `wrong or missing host address: ${list(wrongAddress)}`, fix: SETUP_FIX });
  else if (down.length > 0) rows.push({ name: 'taps', status: 'fail', detail: `down: ${list(down)}`, fix: SETUP_FIX });
  else rows.push({ name: 'taps', status: 'ok', detail: `${plan.slots} taps ${plan.devicePrefix}0-${plan.slots - 1}, owner and addresses as planned` });
  rows.push(
    state.forwarding
      ? { name: 'ip forwarding', status: 'ok', detail: 'net.ipv4.ip_forward = 1' }
      : { name: 'ip forwarding', status: 'fail', detail: 'net.ipv4.ip_forward = 0: guests have no internet', fix: SETUP_FIX },
  );
  if (state.tableLoaded === true) rows.push({ name: 'nftables', status: 'ok', detail: `table ${NFT_FAMILY} ${NFT_TABLE} loaded` });
  else if (state.tableLoaded === false) rows.push({ name: 'nftables', status: 'fail', detail: `table ${NFT_FAMILY} ${NFT_TABLE} is not loaded: guests would be unfenced`, fix: SETUP_FIX });
  else rows.push({ name: 'nftables', status: 'warn', detail: `cannot read the ruleset as this user (${state.tableError ?? 'unknown error'})`, fix: 'run paygress-agent doctor as root to check the table' });
  return rows;
}

export async function netStatusRows(plan: TapNetworkConfig): Promise<CheckResult[]> {
  return netStateRows(await inspectNet(plan), plan);
}

/**
 * passt as packaged in Debian 12 (0.0~git20230309, `--version` says "unknown
 * version") never completes inbound TCP: its own pcap shows it ignoring the
 * guest's correct SYN-ACK, so the SSH forward cannot work.
 */
export async function checkPasst(passtBinary: string): Promise<CheckResult> {
  const res = await execa(passtBinary, ['--version'], { reject: false, stdin: 'ignore', timeout: 5000 });
  const text = `${String(res.stdout ?? '')} ${String(res.stderr ?? '')}`;
  if (res.failed && res.exitCode === undefined) return { name: 'network passt', status: 'fail', detail: `${passtBinary} cannot be run`, fix: 'install passt, or set drivers.kvm.network to "tap"' };
  const snapshot = /git(\d{8})/.exec(text)?.[1];
  if (/unknown version/.test(text) || (snapshot !== undefined && snapshot <= '20230309')) {
    return {
      name: 'network passt',
      status: 'fail',
      detail: 'this passt (Debian 12 snapshot git20230309) never completes inbound TCP: it ignores the guest\'s SYN-ACK, so no consumer could SSH in; it does not fence the host\'s addresses or private ranges either',
      fix: 'set drivers.kvm.network to "tap" (see README, guest network)',
    };
  }
  return { name: 'network passt', status: 'warn', detail: `passt ${text.trim().split('\n')[0]}: inbound SSH untested with this version; host addresses and private ranges are not fenced`, fix: 'prefer drivers.kvm.network "tap"' };
}

/** What the configured mode means for the guest's reach, as a row. */
export function networkModeRow(network: string): CheckResult | undefined {
  if (network === 'user') {
    return {
      name: 'network user',
      status: 'warn',
      detail: 'guests reach the host\'s loopback at 10.0.2.2 (relays, other tenants\' SSH forwards), its addresses, private ranges and 169.254.169.254',
      fix: 'set drivers.kvm.network to "tap" (or "restricted" for no internet)',
    };
  }
  if (network === 'restricted') return { name: 'network', status: 'ok', detail: 'restricted: SSH forward only, guests have no outbound connections (no internet)' };
  return undefined;
}
