/**
 * guestNice: a VM the KVM driver starts (real qemu, TCG, the tiny guest) has
 * every thread at the configured nice value, and so has its autogroup where
 * the kernel has them (qemu -daemonize puts it in a session of its own); 0
 * leaves qemu as it started. Read back from /proc, the scheduler's own view.
 */
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { getPriority, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvmDriver } from '../../src/drivers/kvm/index.js';
import type { WorkloadSpec } from '../../src/drivers/types.js';
import { silentLogger } from '../../src/util/logger.js';
import { ensureTinyGuest, tinyDriverConfig, type TinyGuest } from '../support/tiny-guest.js';

let guest: TinyGuest;
let root: string;
const created: { driver: KvmDriver; id: string }[] = [];

function driver(guestNice: number | undefined, ports: { from: number; to: number }): KvmDriver {
  const config = tinyDriverConfig(guest, {
    vmRoot: join(root, 'vms'),
    portRange: ports,
    namePrefix: 'paygress-nicetest-',
    guestNice,
  });
  return new KvmDriver(config, silentLogger);
}

function spec(id: string): WorkloadSpec {
  return { id, hostname: `host-${id}`, vcpus: 1, memoryMb: 256, diskGb: 2, rootPassword: 'not-a-real-password-1', sshKeys: [] };
}

/** Nice value of every thread of `pid`: field 19 of /proc/<pid>/task/<tid>/stat. */
function threadNices(pid: number): number[] {
  return readdirSync(`/proc/${pid}/task`).map((tid) => {
    const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19 - 3]);
  });
}

/** The autogroup's nice value, or undefined when the kernel has no autogroups. */
function autogroupNice(pid: number): number | undefined {
  const file = `/proc/${pid}/autogroup`;
  if (!existsSync(file)) return undefined;
  const m = /nice\s+(-?\d+)/.exec(readFileSync(file, 'utf8'));
  return m ? Number(m[1]) : undefined;
}

const autogroupsOn = (() => {
  try {
    return readFileSync('/proc/sys/kernel/sched_autogroup_enabled', 'utf8').trim() === '1';
  } catch {
    return false;
  }
})();

beforeAll(async () => {
  guest = await ensureTinyGuest();
  root = mkdtempSync(join(tmpdir(), 'pga-nice-'));
}, 300_000);

afterAll(async () => {
  for (const c of created) await c.driver.destroy(c.id).catch(() => undefined);
  if (root) rmSync(root, { recursive: true, force: true });
});

describe('guestNice', () => {
  it('puts every qemu thread (and its autogroup) at the configured nice value', async () => {
    const d = driver(7, { from: 46100, to: 46119 });
    const ownBefore = getPriority();
    const h = await d.create(spec('nice7'));
    created.push({ driver: d, id: 'nice7' });
    const nices = threadNices(h.pid);
    // qemu has a main loop, an RCU thread and a vCPU thread at least.
    expect(nices.length).toBeGreaterThanOrEqual(3);
    expect(new Set(nices)).toEqual(new Set([7]));
    if (autogroupsOn) expect(autogroupNice(h.pid)).toBe(7);
    // The caller (the agent) keeps its own priority.
    expect(getPriority()).toBe(ownBefore);
    await d.destroy('nice7');
  }, 60_000);

  it('leaves qemu at the nice value it started with when 0', async () => {
    const d = driver(0, { from: 46120, to: 46139 });
    const h = await d.create(spec('nice0'));
    created.push({ driver: d, id: 'nice0' });
    const own = getPriority();
    expect(new Set(threadNices(h.pid))).toEqual(new Set([own]));
    if (autogroupsOn) expect(autogroupNice(h.pid)).toBe(0);
    await d.destroy('nice0');
  }, 60_000);
});
