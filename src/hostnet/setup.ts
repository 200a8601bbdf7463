/**
 * The install-time host setup of the tap network (root, once per boot, from
 * systemd/paygress-agent-net.service): the taps of the slot plan, owned by
 * the service user, forwarding on, the nftables table loaded. `up` is
 * idempotent and also shrinks a pool that got smaller; `down` removes what
 * `up` made. The agent itself never runs any of this.
 */
import { readFile, readdir, writeFile } from 'node:fs/promises';
import { execa } from 'execa';
import { tapConfigProblem, tapSlots, type TapNetworkConfig, type TapSlot } from './plan.js';
import { buildNftRuleset, NFT_FAMILY, NFT_TABLE } from './ruleset.js';

const SYS_NET = '/sys/class/net';
const FORWARDING = '/proc/sys/net/ipv4/ip_forward';

export interface TapState {
  slot: TapSlot;
  exists: boolean;
  /** uid from /sys/class/net/TAP/owner; undefined when unowned or missing. */
  ownerUid?: number;
  /** IPv4 addresses with prefix, e.g. `10.77.0.1/30`. */
  addresses: string[];
  up: boolean;
}

export interface NetState {
  forwarding: boolean;
  /** uid of the configured user, undefined when the user does not exist. */
  userUid?: number;
  taps: TapState[];
  /** Devices named like the pool's taps beyond the configured slot count. */
  strayTaps: string[];
  /** true/false; undefined when nftables could not be read (not root, no nft). */
  tableLoaded?: boolean;
  tableError?: string;
}

async function readText(file: string): Promise<string | undefined> {
  try {
    return (await readFile(file, 'utf8')).trim();
  } catch {
    return undefined;
  }
}

async function uidOf(user: string): Promise<number | undefined> {
  const res = await execa('id', ['-u', '--', user], { reject: false, stdin: 'ignore' });
  return res.exitCode === 0 && /^\d+$/.test(String(res.stdout).trim()) ? Number(String(res.stdout).trim()) : undefined;
}

async function ipv4Addresses(dev: string): Promise<string[]> {
  const res = await execa('ip', ['-j', '-4', 'addr', 'show', 'dev', dev], { reject: false, stdin: 'ignore' });
  if (res.exitCode !== 0) return [];
  try {
    const links = JSON.parse(String(res.stdout)) as { addr_info?: { local?: string; prefixlen?: number }[] }[];
    return links.flatMap((l) => (l.addr_info ?? []).map((a) => `${a.local}/${a.prefixlen}`));
  } catch {
    return [];
  }
}

async function tapState(slot: TapSlot): Promise<TapState> {
  const base = `${SYS_NET}/${slot.tap}`;
  const flags = await readText(`${base}/flags`);
  if (flags === undefined) return { slot, exists: false, addresses: [], up: false };
  const owner = await readText(`${base}/owner`);
  return {
    slot,
    exists: true,
    // The kernel shows -1 for a tap anyone with CAP_NET_ADMIN may open.
    ownerUid: owner !== undefined && /^\d+$/.test(owner) ? Number(owner) : undefined,
    addresses: await ipv4Addresses(slot.tap),
    up: (Number.parseInt(flags, 16) & 1) === 1,
  };
}

async function strayTaps(cfg: TapNetworkConfig): Promise<string[]> {
  const re = new RegExp(`^${cfg.devicePrefix}(\\d+)$`);
  const names = await readdir(SYS_NET).catch(() => [] as string[]);
  return names.filter((n) => {
    const m = re.exec(n);
    return m !== null && Number(m[1]) >= cfg.slots;
  });
}

export async function inspectNet(cfg: TapNetworkConfig): Promise<NetState> {
  const problem = tapConfigProblem(cfg);
  if (problem) throw new RangeError(problem);
  const nft = await execa('nft', ['list', 'table', NFT_FAMILY, NFT_TABLE], { reject: false, stdin: 'ignore' });
  const nftErr = String(nft.stderr ?? '');
  let tableLoaded: boolean | undefined;
  if (nft.exitCode === 0) tableLoaded = true;
  else if (/No such file or directory/.test(nftErr)) tableLoaded = false;
  return {
    forwarding: (await readText(FORWARDING)) === '1',
    userUid: await uidOf(cfg.user),
    taps: await Promise.all(tapSlots(cfg).map(tapState)),
    strayTaps: await strayTaps(cfg),
    tableLoaded,
    tableError: tableLoaded === undefined ? (nft.failed && nft.exitCode === undefined ? 'nft is not installed' : nftErr.trim().split('\n')[0]) : undefined,
  };
}

async function run(cmd: string, args: string[], input?: string): Promise<void> {
  await execa(cmd, args, { input, stdin: input === undefined ? 'ignore' : undefined, stdout: 'ignore' });
}

export async function netUp(cfg: TapNetworkConfig, say: (line: string) => void = () => undefined): Promise<void> {
  const problem = tapConfigProblem(cfg);
  if (problem) throw new RangeError(problem);
  const uid = await uidOf(cfg.user);
  if (uid === undefined) throw new Error(`user ${cfg.user} does not exist (create the service user first)`);
  await writeFile(FORWARDING, '1\n');
  for (const state of await Promise.all(tapSlots(cfg).map(tapState))) {
    const { slot } = state;
    if (state.exists && state.ownerUid !== uid) {
      // A tap's owner cannot be changed; only a tap nobody holds open is recreated.
      await run('ip', ['link', 'del', 'dev', slot.tap]);
      state.exists = false;
    }
    if (!state.exists) {
      await run('ip', ['tuntap', 'add', 'dev', slot.tap, 'mode', 'tap', 'user', cfg.user]);
      say(`created ${slot.tap}`);
    }
    const want = `${slot.hostAddress}/${slot.prefixLength}`;
    const have = state.exists ? state.addresses : [];
    if (have.length !== 1 || have[0] !== want) {
      await run('ip', ['-4', 'addr', 'flush', 'dev', slot.tap]);
      await run('ip', ['addr', 'add', want, 'dev', slot.tap]);
    }
    // The host never speaks IPv6 with a guest (the forward chain drops it too).
    await writeFile(`/proc/sys/net/ipv6/conf/${slot.tap}/disable_ipv6`, '1\n').catch(() => undefined);
    if (cfg.loopbackForward) await writeFile(`/proc/sys/net/ipv4/conf/${slot.tap}/route_localnet`, '1\n');
    await run('ip', ['link', 'set', 'dev', slot.tap, 'up']);
  }
  for (const tap of await strayTaps(cfg)) {
    await run('ip', ['link', 'del', 'dev', tap]);
    say(`removed ${tap} (beyond ${cfg.slots} slots)`);
  }
  await run('nft', ['-f', '-'], buildNftRuleset(cfg));
  say(`nftables table ${NFT_FAMILY} ${NFT_TABLE} loaded; ${cfg.slots} slots, ports ${cfg.firstPort}-${cfg.firstPort + cfg.slots - 1}`);
}

/** Remove the table and every tap of the pool. Forwarding stays as it is: something else may rely on it. */
export async function netDown(cfg: TapNetworkConfig, say: (line: string) => void = () => undefined): Promise<void> {
  const problem = tapConfigProblem(cfg);
  if (problem) throw new RangeError(problem);
  const del = await execa('nft', ['delete', 'table', NFT_FAMILY, NFT_TABLE], { reject: false, stdin: 'ignore' });
  if (del.exitCode === 0) say(`nftables table ${NFT_FAMILY} ${NFT_TABLE} deleted`);
  const re = new RegExp(`^${cfg.devicePrefix}\\d+$`);
  for (const name of (await readdir(SYS_NET).catch(() => [] as string[])).filter((n) => re.test(n))) {
    await run('ip', ['link', 'del', 'dev', name]);
    say(`removed ${name}`);
  }
}
