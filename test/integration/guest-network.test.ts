/**
 * Can a guest reach the host's private (127.0.0.1-only) services?
 *
 * With qemu's user-mode network the host's loopback is the guest's 10.0.2.2.
 * The tiny guest's `paygress.probe=ADDR:PORT` kernel arguments make it
 * connect out after boot and print what the other end sent on its serial
 * console; the host listeners send a random token, so "reached" means the
 * token arrived, not merely that something accepted a connection.
 *
 * Probes per VM: the gateway 10.0.2.2, 127.0.0.1 routed out through the
 * gateway (what a hostile guest can do with route_localnet), and the host's
 * real address (a listener on 0.0.0.0).
 */
import { createServer, type Server } from 'node:net';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { networkInterfaces, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvmDriver } from '../../src/drivers/kvm/index.js';
import { probeSshBanner } from '../../src/drivers/kvm/readiness.js';
import { findPasstPids } from '../../src/drivers/kvm/passt.js';
import { silentLogger } from '../../src/util/logger.js';
import { until } from '../support/net.js';
import { ensureTinyGuest, tinyDriverConfig, TINY_GUEST_MARKER, type TinyGuest } from '../support/tiny-guest.js';

const LOOPBACK_PORT = 45150;
const PUBLIC_PORT = 45151;
const PORTS: Record<Mode, { from: number; to: number }> = {
  user: { from: 45160, to: 45164 },
  restricted: { from: 45165, to: 45169 },
  passt: { from: 45170, to: 45174 },
};
type Mode = 'user' | 'restricted' | 'passt';

let guest: TinyGuest;
let root: string;
let hostIp: string | undefined;
const loopbackToken = `LOOPBACK-${randomBytes(6).toString('hex')}`;
const publicToken = `PUBLIC-${randomBytes(6).toString('hex')}`;
const servers: Server[] = [];

function listen(host: string, port: number, token: string): Promise<Server> {
  return new Promise((resolve, reject) => {
    const srv = createServer((s) => {
      // The guest side may reset after reading; that is not a test failure.
      s.on('error', () => undefined);
      s.end(`${token}\n`);
    });
    srv.once('error', reject);
    srv.listen({ host, port, exclusive: true }, () => resolve(srv));
  });
}

function firstExternalIpv4(): string | undefined {
  for (const addrs of Object.values(networkInterfaces())) {
    for (const a of addrs ?? []) if (a.family === 'IPv4' && !a.internal) return a.address;
  }
  return undefined;
}

interface Outcome {
  serial: string;
  banner: boolean;
  passtDuring: number;
  passtAfter: number;
}

/** Boot one VM in `mode`, let its probes run, check the SSH forward, destroy it. */
async function run(mode: Mode): Promise<Outcome> {
  const probes = [`10.0.2.2:${LOOPBACK_PORT}`, `127.0.0.1:${LOOPBACK_PORT}`];
  if (hostIp) probes.push(`${hostIp}:${PUBLIC_PORT}`);
  const config = tinyDriverConfig(guest, {
    vmRoot: join(root, mode),
    portRange: PORTS[mode],
    namePrefix: 'paygress-netest-',
    append: `${guest.append} ${probes.map((p) => `paygress.probe=${p}`).join(' ')}`,
    network: mode,
  });
  const d = new KvmDriver(config, silentLogger);
  const id = `net-${mode}`;
  const h = await d.create({ id, hostname: id, vcpus: 1, memoryMb: 256, diskGb: 1, rootPassword: 'x-not-used-x', sshKeys: [] });
  const serial = () => d.readConsole(id);
  try {
    await until(async () => (await serial()).includes('paygress-probe: done'), 150_000, 'guest probes');
    expect(await serial()).toContain(TINY_GUEST_MARKER);
    const banner = await probeSshBanner('127.0.0.1', h.sshPort, 5_000);
    const passtDuring = (await findPasstPids(join(h.dir, 'passt.sock'))).length;
    const out = await serial();
    await d.destroy(id);
    const passtAfter = (await findPasstPids(join(h.dir, 'passt.sock'))).length;
    const lines = out.split('\n').filter((l) => l.startsWith('paygress-probe:'));
    console.log(`[guest-network] ${mode}: ssh banner ${banner ? 'yes' : 'no'}\n  ${lines.join('\n  ')}`);
    return { serial: out, banner, passtDuring, passtAfter };
  } finally {
    await d.destroy(id).catch(() => undefined);
  }
}

function reached(serial: string, probe: string, token: string): boolean {
  return serial.split('\n').some((l) => l.startsWith(`paygress-probe: ${probe} -> `) && l.includes(token));
}

const results = new Map<Mode, Outcome>();
async function outcome(mode: Mode): Promise<Outcome> {
  if (!results.has(mode)) results.set(mode, await run(mode));
  return results.get(mode)!;
}

describe('guest access to the host network (real qemu, TCG, tiny guest)', () => {
  beforeAll(async () => {
    guest = await ensureTinyGuest();
    root = mkdtempSync(join(tmpdir(), 'paygress-guestnet-'));
    hostIp = firstExternalIpv4();
    servers.push(await listen('127.0.0.1', LOOPBACK_PORT, loopbackToken));
    if (hostIp) servers.push(await listen('0.0.0.0', PUBLIC_PORT, publicToken));
  }, 600_000);

  afterAll(async () => {
    for (const s of servers) await new Promise((r) => s.close(r));
    if (root) rmSync(root, { recursive: true, force: true });
  });

  it('user (the old mode): the guest reaches a service bound to the host\'s 127.0.0.1 at 10.0.2.2, and SSH is forwarded', async () => {
    const o = await outcome('user');
    // This is the hole: a loopback-only service answers the guest.
    expect(reached(o.serial, `10.0.2.2:${LOOPBACK_PORT}`, loopbackToken)).toBe(true);
    expect(o.banner).toBe(true);
  }, 240_000);

  it('restricted (the default): no loopback service is reachable by any route, nothing outbound, SSH is forwarded', async () => {
    const o = await outcome('restricted');
    expect(o.serial).not.toContain(loopbackToken);
    expect(o.serial).not.toContain(publicToken);
    expect(o.serial).toContain(`paygress-probe: 10.0.2.2:${LOOPBACK_PORT} -> `);
    expect(o.banner).toBe(true);
  }, 240_000);

  it('the guest-to-host-loopback check fails on the old mode and passes on the default mode', async () => {
    const cannotReachLoopback = (o: Outcome) => !o.serial.includes(loopbackToken);
    expect(cannotReachLoopback(await outcome('user'))).toBe(false);
    expect(cannotReachLoopback(await outcome('restricted'))).toBe(true);
  }, 480_000);

  it('passt: outbound works, the host loopback is not reachable, and passt lives and dies with the VM', async () => {
    const o = await outcome('passt');
    expect(o.serial).not.toContain(loopbackToken);
    if (hostIp) expect(reached(o.serial, `${hostIp}:${PUBLIC_PORT}`, publicToken)).toBe(true);
    expect(o.passtDuring).toBe(1);
    expect(o.passtAfter).toBe(0);
    // Not asserted: Debian 12's passt (git20230309) never completes inbound TCP
    // to the guest (it ignores the guest's SYN-ACK, seen in a pcap), so the
    // banner is expected to be missing here; a newer passt should show it.
    console.log(`[guest-network] passt ssh forward: ${o.banner ? 'works' : 'does not work with this passt'}`);
  }, 240_000);
});
