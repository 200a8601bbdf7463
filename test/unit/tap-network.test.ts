import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { buildQemuArgv, type QemuArgs } from '../../src/drivers/kvm/argv.js';
import { buildCloudConfig } from '../../src/drivers/kvm/cloud-config.js';
import { SlotAllocator } from '../../src/drivers/kvm/slots.js';
import { checkPasst, networkModeRow, netStateRows } from '../../src/hostnet/checks.js';
import { parseCidr, tapConfigProblem, tapSlot, tapSlots, type TapNetworkConfig } from '../../src/hostnet/plan.js';
import { buildNftRuleset, GUEST_BLOCKED_RANGES } from '../../src/hostnet/ruleset.js';
import type { NetState } from '../../src/hostnet/setup.js';
import { ConfigError, parseConfig } from '../../src/config/load.js';
import { sha512crypt } from '../../src/util/sha512crypt.js';

const plan: TapNetworkConfig = {
  slots: 4,
  devicePrefix: 'pgtap',
  subnet: '10.77.0.0/16',
  firstPort: 42000,
  publicAddresses: [],
  loopbackForward: false,
  dnsResolver: '10.0.0.53',
  user: 'paygress',
};

describe('tap slot plan', () => {
  it('cuts one /30 per slot: host .1, guest .2, one port and one MAC each', () => {
    expect(tapSlot(plan, 0)).toEqual({
      index: 0, tap: 'pgtap0', hostAddress: '10.77.0.1', guestAddress: '10.77.0.2', network: '10.77.0.0/30', prefixLength: 30, mac: '52:54:00:70:00:00', port: 42000,
    });
    expect(tapSlot({ ...plan, slots: 300 }, 257)).toMatchObject({ tap: 'pgtap257', hostAddress: '10.77.4.5', guestAddress: '10.77.4.6', mac: '52:54:00:70:01:01', port: 42257 });
    const all = tapSlots(plan);
    expect(new Set(all.map((s) => s.guestAddress)).size).toBe(4);
    expect(() => tapSlot(plan, 4)).toThrow(RangeError);
  });

  it('refuses plans that do not fit', () => {
    expect(tapConfigProblem(plan)).toBeUndefined();
    expect(tapConfigProblem({ ...plan, subnet: '10.77.0.0/29' })).toMatch(/holds only 2 slots/);
    expect(tapConfigProblem({ ...plan, subnet: '10.77.0.1/16' })).toMatch(/host bits/);
    expect(tapConfigProblem({ ...plan, devicePrefix: 'pg-tap' })).toMatch(/devicePrefix/);
    expect(tapConfigProblem({ ...plan, devicePrefix: 'abcdefghij', slots: 1_000_000, subnet: '10.0.0.0/8' })).toMatch(/too long/);
    expect(tapConfigProblem({ ...plan, firstPort: 65534 })).toMatch(/ports/);
    expect(tapConfigProblem({ ...plan, dnsResolver: 'dns.example' })).toMatch(/dnsResolver/);
    expect(tapConfigProblem({ ...plan, user: 'root; rm' })).toMatch(/user/);
    expect(() => parseCidr('300.1.1.0/24')).toThrow(RangeError);
  });
});

describe('nftables ruleset', () => {
  const text = buildNftRuleset(plan);
  const lines = text.split('\n').map((l) => l.trim());
  const at = (needle: string) => {
    const i = lines.findIndex((l) => l === needle);
    expect(i, needle).toBeGreaterThanOrEqual(0);
    return i;
  };

  it('replaces its one table atomically', () => {
    expect(lines.slice(0, 3)).toEqual(['table inet paygress {}', 'delete table inet paygress', 'table inet paygress {']);
  });

  it('lets guests answer the host but open nothing on it', () => {
    expect(at('iifname "pgtap*" ct state established,related accept')).toBeLessThan(at('iifname "pgtap*" drop'));
  });

  it('checks each slot\'s source before anything is accepted, and drops IPv6 from and to guests', () => {
    const established = at('ct state established,related accept');
    for (const s of tapSlots(plan)) expect(at(`iifname "${s.tap}" ip saddr != ${s.guestAddress} drop`)).toBeLessThan(established);
    expect(at('iifname "pgtap*" meta nfproto ipv6 drop')).toBeLessThan(established);
    expect(at('oifname "pgtap*" meta nfproto ipv6 drop')).toBeLessThan(established);
  });

  it('allows the (private) resolver before dropping private ranges, and drops tap to tap first', () => {
    const blocked = at(`iifname "pgtap*" ip daddr { ${GUEST_BLOCKED_RANGES.join(', ')} } drop`);
    expect(at('iifname "pgtap*" oifname "pgtap*" drop')).toBeLessThan(at('iifname "pgtap*" ip daddr 10.0.0.53 udp dport 53 accept'));
    expect(at('iifname "pgtap*" ip daddr 10.0.0.53 udp dport 53 accept')).toBeLessThan(blocked);
    expect(at('iifname "pgtap*" ip daddr 10.0.0.53 tcp dport 53 accept')).toBeLessThan(blocked);
    expect(blocked).toBeLessThan(at('iifname "pgtap*" accept'));
    expect(GUEST_BLOCKED_RANGES).toEqual(expect.arrayContaining(['127.0.0.0/8', '169.254.0.0/16', '100.64.0.0/10', '10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16']));
  });

  it('forwards one port per slot to its guest\'s :22, only DNAT\'ed SSH goes into a tap, guests are masqueraded out', () => {
    expect(lines.filter((l) => l === 'fib daddr type local tcp dport 42001 dnat ip to 10.77.0.6:22')).toHaveLength(2);
    expect(at('oifname "pgtap*" ct status dnat tcp dport 22 accept')).toBeLessThan(at('oifname "pgtap*" drop'));
    expect(lines).toContain('ip saddr 10.77.0.0/16 oifname != "pgtap*" masquerade');
    expect(text).not.toContain('127.0.0.1');
  });

  it('limits DNAT to the public addresses when given, and adds loopback only when asked', () => {
    const t = buildNftRuleset({ ...plan, publicAddresses: ['203.0.113.7', '203.0.113.8'], loopbackForward: true });
    expect(t).toContain('ip daddr { 203.0.113.7, 203.0.113.8 } tcp dport 42000 dnat ip to 10.77.0.2:22');
    expect(t).not.toContain('fib daddr type local');
    expect(t).toContain('ip daddr 127.0.0.1 tcp dport 42003 dnat ip to 10.77.0.14:22');
    expect(t).toContain('ip saddr 127.0.0.0/8 oifname "pgtap*" masquerade');
  });
});

describe('tap mode in qemu argv and the seed', () => {
  const base: QemuArgs = {
    accel: 'tcg', name: 'paygress-vm1', uuid: '0b7c3a56-9a8e-4b0c-8f7e-2d1c3b4a5e6f', dir: '/v/vm1', vcpus: 1, memoryMb: 256, bindAddress: '0.0.0.0', sshPort: 42000,
  };

  it('opens the persistent tap without scripts and gives the NIC the slot\'s MAC', () => {
    const a = buildQemuArgv({ ...base, network: 'tap', tap: { device: 'pgtap3', mac: '52:54:00:70:00:03' } });
    expect(a[a.indexOf('-netdev') + 1]).toBe('tap,id=net0,ifname=pgtap3,script=no,downscript=no');
    expect(a[a.indexOf('-device') + 1]).toBe('virtio-net-pci,netdev=net0,mac=52:54:00:70:00:03');
    expect(a.join(' ')).not.toContain('hostfwd');
    expect(() => buildQemuArgv({ ...base, network: 'tap' })).toThrow(RangeError);
    expect(() => buildQemuArgv({ ...base, network: 'tap', tap: { device: 'pgtap0,script=/x', mac: '52:54:00:70:00:03' } })).toThrow(RangeError);
  });

  it('writes a version 2 network-config matched by MAC with address, default route and resolver', () => {
    const files = buildCloudConfig({
      hostname: 'vm1', passwordHash: sha512crypt('pw', 'abcdefgh12345678'), sshKeys: [], finalMessageToken: 'tok_0123456789', instanceId: 'vm1-x',
      network: { mac: '52:54:00:70:00:01', address: '10.77.0.6/30', gateway: '10.77.0.5', dns: '1.1.1.1' },
    });
    expect(parse(files.networkConfig!, { version: '1.1' })).toEqual({
      version: 2,
      ethernets: {
        net0: {
          match: { macaddress: '52:54:00:70:00:01' },
          'set-name': 'eth0',
          addresses: ['10.77.0.6/30'],
          routes: [{ to: '0.0.0.0/0', via: '10.77.0.5' }],
          nameservers: { addresses: ['1.1.1.1'] },
        },
      },
    });
    // A MAC whose groups are all below 60 is a base-60 integer to YAML 1.1 (PyYAML) unless quoted.
    const sexagesimal = buildCloudConfig({
      hostname: 'vm1', passwordHash: sha512crypt('pw', 'abcdefgh12345678'), sshKeys: [], finalMessageToken: 'tok_0123456789', instanceId: 'vm1-x',
      network: { mac: '52:54:00:12:34:56', address: '10.77.0.6/30', gateway: '10.77.0.5', dns: '1.1.1.1' },
    });
    expect((parse(sexagesimal.networkConfig!, { version: '1.1' }) as { ethernets: { net0: { match: { macaddress: unknown } } } }).ethernets.net0.match.macaddress).toBe('52:54:00:12:34:56');
    const without = buildCloudConfig({ hostname: 'vm1', passwordHash: sha512crypt('pw', 'abcdefgh12345678'), sshKeys: [], finalMessageToken: 'tok_0123456789', instanceId: 'vm1-x' });
    expect(without.networkConfig).toBeUndefined();
  });
});

describe('SlotAllocator', () => {
  it('never hands out a slot that is reserved or recorded in a workload folder, and reuses released ones', () => {
    const slots = new SlotAllocator({ ...plan, slots: 3 });
    expect(slots.allocate(new Set([0]))?.index).toBe(1);
    expect(slots.allocate(new Set([0]))?.index).toBe(2);
    expect(slots.allocate(new Set([0]))).toBeUndefined();
    slots.release(1);
    expect(slots.allocate(new Set([0]))?.index).toBe(1);
    expect(() => new SlotAllocator({ ...plan, subnet: 'nope' })).toThrow(/drivers\.kvm\.tap/);
  });
});

describe('doctor rows for the tap network', () => {
  const healthy = (): NetState => ({
    forwarding: true,
    userUid: 999,
    taps: tapSlots(plan).map((slot) => ({ slot, exists: true, ownerUid: 999, addresses: [`${slot.hostAddress}/30`], up: true })),
    strayTaps: [],
    tableLoaded: true,
  });
  const status = (s: NetState) => Object.fromEntries(netStateRows(s, plan).map((r) => [r.name, r.status]));

  it('is all ok when the setup matches the plan, and names each problem with a fix', () => {
    expect(status(healthy())).toEqual({ 'tap user': 'ok', taps: 'ok', 'ip forwarding': 'ok', nftables: 'ok' });
    const broken = healthy();
    broken.taps[2]!.ownerUid = 0;
    broken.forwarding = false;
    broken.tableLoaded = false;
    const rows = netStateRows(broken, plan);
    expect(status(broken)).toEqual({ 'tap user': 'ok', taps: 'fail', 'ip forwarding': 'fail', nftables: 'fail' });
    expect(rows.find((r) => r.name === 'taps')!.detail).toContain('pgtap2');
    for (const r of rows.filter((x) => x.status !== 'ok')) expect(r.fix).toBeTruthy();
    const missing = healthy();
    missing.taps[0] = { ...missing.taps[0]!, exists: false };
    expect(netStateRows(missing, plan).find((r) => r.name === 'taps')!.detail).toMatch(/1 of 4 taps missing: pgtap0/);
    const wrongAddress = healthy();
    wrongAddress.taps[1]!.addresses = ['10.77.0.1/30'];
    expect(status(wrongAddress).taps).toBe('fail');
    expect(status({ ...healthy(), tableLoaded: undefined, tableError: 'Operation not permitted' }).nftables).toBe('warn');
  });
});

describe('doctor rows for the other modes', () => {
  it('refuses the packaged passt (Debian 12: inbound TCP never completes) and warns about user mode', async () => {
    const passt = await checkPasst('passt');
    expect(passt.status).toBe('fail');
    expect(passt.detail).toContain('SYN-ACK');
    expect((await checkPasst('/nonexistent/passt')).status).toBe('fail');
    expect(networkModeRow('user')).toMatchObject({ status: 'warn', detail: expect.stringContaining('10.0.2.2') });
    expect(networkModeRow('restricted')?.status).toBe('ok');
  });
});

describe('config: network "tap"', () => {
  const raw = (kvm: Record<string, unknown>) => ({
    provider: { keyFile: '/k', publicHost: '203.0.113.7' },
    relays: ['wss://r.example'],
    tiers: [{ level: 'dedicated-host', driver: 'kvm' }],
    plans: [{ id: 'p', name: 'P', vcpus: 1, memoryMb: 256, diskGb: 1 }],
    defaultPlan: 'p',
    drivers: { kvm: { baseImage: '/b.qcow2', ...kvm } },
  });
  const parseIt = (kvm: Record<string, unknown>) => parseConfig(raw(kvm), { baseDir: '/', env: {} });

  it('defaults to restricted (no root setup needed) with a ready tap section', () => {
    const kvm = parseIt({}).drivers.kvm!;
    expect(kvm.network).toBe('restricted');
    expect(kvm.tap).toMatchObject({ slots: 32, devicePrefix: 'pgtap', subnet: '10.77.0.0/16', user: 'paygress' });
  });

  it('refuses a tap pool larger than the port range, or one that does not fit its subnet', () => {
    expect(() => parseIt({ network: 'tap', portRange: { from: 42000, to: 42009 }, tap: { slots: 11 } })).toThrow(ConfigError);
    expect(() => parseIt({ network: 'tap', portRange: { from: 42000, to: 42009 }, tap: { slots: 10 } })).not.toThrow();
    expect(() => parseIt({ network: 'tap', tap: { slots: 8, subnet: '10.77.0.0/28' } })).toThrow(/holds only 4 slots/);
    expect(() => parseIt({ network: 'tap', tap: { dnsResolver: 'one.one' } })).toThrow(ConfigError);
  });
});
