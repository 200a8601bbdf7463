/**
 * The tap network's slot plan: which tap device, addresses, MAC and public
 * port slot N has. Pure, and the one place these are computed: the
 * install-time setup (setup.ts) creates exactly these devices and rules, the
 * driver hands them out, the doctor checks them.
 */

/** What the provider config says about the tap network (drivers.kvm.tap + the port range). */
export interface TapNetworkConfig {
  /** How many guests can have a network at once: one tap, one /30, one port each. */
  slots: number;
  /** Tap names are `${devicePrefix}${index}`; at most 15 bytes in total (IFNAMSIZ). */
  devicePrefix: string;
  /** IPv4 CIDR the /30s are cut from, e.g. `10.77.0.0/16`. */
  subnet: string;
  /** Slot i's SSH port is `firstPort + i`, DNAT'ed to the guest's :22. */
  firstPort: number;
  /** Host addresses whose ports are DNAT'ed; empty = every local address. */
  publicAddresses: string[];
  /** Also DNAT 127.0.0.1:port (connections from the host itself, e.g. tests and the operator). */
  loopbackForward: boolean;
  /** The guests' DNS resolver; the only private address a guest may reach (port 53). */
  dnsResolver: string;
  /** User that owns the taps: the agent's qemu runs as this user and opens them without privileges. */
  user: string;
}

export interface TapSlot {
  index: number;
  tap: string;
  /** The host's side of the /30 (the guest's gateway). */
  hostAddress: string;
  guestAddress: string;
  /** `a.b.c.d/30` */
  network: string;
  prefixLength: 30;
  mac: string;
  /** Public port forwarded to guestAddress:22. */
  port: number;
}

/** Tap names the setup may create: letters/digits only (they appear in nft rules and sysctl paths). */
export const DEVICE_PREFIX_RE = /^[a-z][a-z0-9]{0,9}$/;
const IFNAMSIZ = 15;
const IPV4_RE = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;

export function isIpv4(text: string): boolean {
  return IPV4_RE.test(text);
}

export function ipv4ToInt(text: string): number {
  if (!isIpv4(text)) throw new RangeError('not an IPv4 address');
  return text.split('.').reduce((n, part) => n * 256 + Number(part), 0);
}

export function intToIpv4(n: number): string {
  return [24, 16, 8, 0].map((shift) => Math.floor(n / 2 ** shift) % 256).join('.');
}

/** `{base, length}` of an IPv4 CIDR whose host bits are zero, or a RangeError. */
export function parseCidr(text: string): { base: number; length: number } {
  const m = /^([0-9.]+)\/(\d{1,2})$/.exec(text);
  if (!m || !isIpv4(m[1]!)) throw new RangeError('must be an IPv4 CIDR like 10.77.0.0/16');
  const length = Number(m[2]);
  if (length > 30) throw new RangeError('the prefix must be /30 or shorter');
  const base = ipv4ToInt(m[1]!);
  if (base % 2 ** (32 - length) !== 0) throw new RangeError('host bits must be zero');
  return { base, length };
}

/** Why this config cannot make a plan, or undefined when it can. */
export function tapConfigProblem(cfg: TapNetworkConfig): string | undefined {
  if (!Number.isInteger(cfg.slots) || cfg.slots < 1) return 'slots must be a positive integer';
  if (!DEVICE_PREFIX_RE.test(cfg.devicePrefix)) return 'devicePrefix must be 1-10 lowercase letters/digits, starting with a letter';
  if (cfg.devicePrefix.length + String(cfg.slots - 1).length > IFNAMSIZ) return 'devicePrefix is too long for this many slots (15 bytes per device name)';
  let subnet: { base: number; length: number };
  try {
    subnet = parseCidr(cfg.subnet);
  } catch (err) {
    return `subnet ${(err as Error).message}`;
  }
  if (cfg.slots * 4 > 2 ** (32 - subnet.length)) return `subnet ${cfg.subnet} holds only ${2 ** (32 - subnet.length) / 4} slots of 4 addresses`;
  if (!Number.isInteger(cfg.firstPort) || cfg.firstPort < 1 || cfg.firstPort + cfg.slots - 1 > 65535) return 'the slot ports must lie within 1-65535';
  if (!isIpv4(cfg.dnsResolver)) return 'dnsResolver must be an IPv4 address';
  if (cfg.publicAddresses.some((a) => !isIpv4(a))) return 'publicAddresses must be IPv4 addresses';
  if (!/^[a-z_][a-z0-9_-]{0,31}$/.test(cfg.user)) return 'user must be a plain user name';
  return undefined;
}

/** Slot `index` of the plan. */
export function tapSlot(cfg: TapNetworkConfig, index: number): TapSlot {
  const problem = tapConfigProblem(cfg);
  if (problem) throw new RangeError(problem);
  if (!Number.isInteger(index) || index < 0 || index >= cfg.slots) throw new RangeError('slot index out of range');
  const net = parseCidr(cfg.subnet).base + 4 * index;
  return {
    index,
    tap: `${cfg.devicePrefix}${index}`,
    hostAddress: intToIpv4(net + 1),
    guestAddress: intToIpv4(net + 2),
    network: `${intToIpv4(net)}/30`,
    prefixLength: 30,
    // 52:54:00 is qemu's prefix; the rest numbers the slot, so a guest's MAC never changes with its slot.
    mac: `52:54:00:70:${hex2(Math.floor(index / 256))}:${hex2(index % 256)}`,
    port: cfg.firstPort + index,
  };
}

export function tapSlots(cfg: TapNetworkConfig): TapSlot[] {
  return Array.from({ length: cfg.slots }, (_, i) => tapSlot(cfg, i));
}

function hex2(n: number): string {
  return n.toString(16).padStart(2, '0');
}
