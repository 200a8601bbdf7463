/**
 * The unit as shipped, under a real systemd as PID 1: a Debian 12 root booted
 * with `systemd-nspawn -b` (scripts/build-systemd-root.sh) inside a network
 * namespace of the test's own, so nothing the install does reaches the host's
 * network. The built checkout stands in for clone + build at
 * /opt/paygress-agent; README's install blocks run verbatim inside; the relays
 * and the consumer (the `paygress` CLI) run in the same namespace.
 *
 * Then, from outside through the relay: spawn → access details → ready;
 * qemu's user, seccomp filters and OOM score; `systemctl restart` with the VM
 * running → re-adopted; `systemctl reload` with live and restart-only changes,
 * and with a bad config; `systemctl stop` leaves qemu running; stop.
 */
import { execa } from 'execa';
import { chmodSync, cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { generateSecretKey, getPublicKey } from 'nostr-tools';
import { decode, nsecEncode } from 'nostr-tools/nip19';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureTinyGuest } from '../support/tiny-guest.js';
import { until } from '../support/net.js';
import {
  bootContainer,
  createNetns,
  deleteNetns,
  ensureSystemdRoot,
  readmeBlock,
  startRelayInNetns,
  type Container,
} from '../support/systemd-root.js';

const REPO = resolve(import.meta.dirname, '..', '..');
const NETNS = `pga-sd-${process.pid}`;
const RELAY_PORTS = [47000, 47001] as const;
const VM_PORTS = { from: 47010, to: 47019 };
const CONFIG = '/etc/paygress-agent/provider.json';
const UNIT = 'paygress-agent';

type Reply = Record<string, unknown> & { type: string };

/** CAP_SYS_RESOURCE (bit 24) in this process's effective set: needed to lower an oom_score_adj. */
function hostMayLowerOomScore(): boolean {
  const eff = /^CapEff:\s+([0-9a-f]+)$/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1] ?? '0';
  return ((BigInt(`0x${eff}`) >> 24n) & 1n) === 1n;
}

describe('the unit under a real systemd (nspawn)', () => {
  const cleanup: Array<() => Promise<void> | void> = [];
  let ct: Container;
  let app: string;
  let relays: string[] = [];
  let provider = '';
  let consumerKey = '';
  let config: Record<string, any>;
  let workload = '';

  const inside = (cmd: string[], timeoutMs?: number) => ct.run(cmd, { timeoutMs });
  const sh = async (script: string) => {
    const r = await ct.run(['bash', '-euo', 'pipefail', '-c', script], { timeoutMs: 180_000 });
    expect(r.exitCode, `${script}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`).toBe(0);
    return r;
  };
  const journal = async () => (await inside(['journalctl', '-u', UNIT, '-o', 'cat', '--no-pager'])).stdout;
  const listening = async () => (await journal()).split('\n').filter((l) => l.includes('agent listening')).length;
  const mainPid = async () => Number((await inside(['systemctl', 'show', '-p', 'MainPID', '--value', UNIT])).stdout.trim());
  const status = async (pid: number | string) => (await inside(['cat', `/proc/${pid}/status`])).stdout;
  const field = (text: string, name: string) => new RegExp(`^${name}:\\s+(.*)$`, 'm').exec(text)?.[1]?.trim();
  const alive = async (pid: number) => (await inside(['kill', '-0', String(pid)])).exitCode === 0;
  const qemuPid = () => Number(readFileSync(join(ct.root, 'var/lib/paygress-agent/vms', workload, 'qemu.pid'), 'utf8').trim());

  /** The `paygress` CLI in the namespace; JSON replies, one per line. */
  const consumer = async (args: string[], relay = relays[0]!, timeoutS = 120) => {
    const r = await execa(
      'ip',
      ['netns', 'exec', NETNS, process.execPath, '--import', 'tsx', join(REPO, 'src/cli/consumer.ts'), ...args,
        '--provider', provider, '--relay', relay, '--key', consumerKey, '--json', '--timeout', String(timeoutS)],
      { cwd: REPO, reject: false, stdin: 'ignore', env: { PAYGRESS_ROOT_PASSWORD: 'systemd-test-password' }, timeout: (timeoutS + 30) * 1000 },
    );
    const replies = String(r.stdout).split('\n').filter(Boolean).map((l) => JSON.parse(l) as Reply);
    return { exitCode: r.exitCode, replies, stderr: String(r.stderr) };
  };

  const writeConfig = (cfg: Record<string, unknown>) => writeFileSync(join(ct.root, CONFIG.slice(1)), JSON.stringify(cfg, null, 2));

  beforeAll(async () => {
    const [{ tarball }, guest] = await Promise.all([ensureSystemdRoot(), ensureTinyGuest()]);
    // The built checkout: what `git clone` + `npm ci && npm run build` leave in /opt/paygress-agent.
    app = mkdtempSync(join(tmpdir(), 'pga-sd-app-'));
    cleanup.push(() => rmSync(app, { recursive: true, force: true }));
    await execa(process.execPath, [join(REPO, 'node_modules/typescript/bin/tsc'), '-p', join(REPO, 'tsconfig.json'), '--outDir', join(app, 'dist')]);
    for (const part of ['package.json', 'systemd', 'config', 'scripts']) cpSync(join(REPO, part), join(app, part), { recursive: true });
    mkdirSync(join(app, 'node_modules'));
    chmodSync(app, 0o755);

    await createNetns(NETNS);
    cleanup.push(() => deleteNetns(NETNS));
    for (const port of RELAY_PORTS) {
      const relay = await startRelayInNetns(NETNS, port);
      cleanup.push(() => relay.stop());
      relays.push(relay.url);
    }

    ct = await bootContainer({
      tarball,
      netns: NETNS,
      binds: [
        { from: app, to: '/opt/paygress-agent', readOnly: true },
        { from: join(REPO, 'node_modules'), to: '/opt/paygress-agent/node_modules', readOnly: true },
        { from: process.execPath, to: '/usr/bin/node', readOnly: true },
        { from: guest.dir, to: '/srv/tiny-guest', readOnly: true },
      ],
    });
    cleanup.push(() => ct.destroy());

    const keyDir = mkdtempSync(join(tmpdir(), 'pga-sd-consumer-'));
    cleanup.push(() => rmSync(keyDir, { recursive: true, force: true }));
    consumerKey = join(keyDir, 'consumer.nsec');
    writeFileSync(consumerKey, `${nsecEncode(generateSecretKey())}\n`, { mode: 0o600 });

    config = {
      provider: { keyFile: '/etc/paygress-agent/provider.nsec', publicHost: '127.0.0.1', name: 'systemd test' },
      relays: [relays[0]],
      tiers: [{ level: 'dedicated-host', driver: 'kvm' }],
      plans: [{ id: 'tiny', name: 'Tiny', description: 'test', vcpus: 1, memoryMb: 256, diskGb: 1, durationSeconds: 600 }],
      defaultPlan: 'tiny',
      drivers: {
        kvm: {
          accel: 'tcg',
          baseImage: '/srv/tiny-guest/base.qcow2',
          kernel: '/srv/tiny-guest/vmlinuz',
          initrd: '/srv/tiny-guest/initrd.img',
          // no_timer_check: on a host loaded by other tests the TCG guest's
          // IO-APIC timer check can fail and panic the kernel (seen here).
          append: `${guest.append} no_timer_check`,
          readiness: guest.readiness,
          bindAddress: '127.0.0.1',
          portRange: VM_PORTS,
          pidfileTimeoutMs: 30_000,
          // The guest at normal priority: other tests load this host, and a
          // niced TCG guest waited minutes for CPU here. Priority is not under test.
          guestNice: 0,
        },
      },
    };
  }, 900_000);

  afterAll(async () => {
    for (const step of cleanup.reverse()) await step();
  }, 120_000);

  it("README's install blocks, run verbatim, start the service (doctor passes as the service user)", async () => {
    await sh(readmeBlock('files'));
    // The operator's edit of the example config.
    writeConfig(config);
    const start = await sh(readmeBlock('start'));
    expect(start.stdout).toMatch(/0 blockers$/m);
    provider = getPublicKey(decode(readFileSync(join(ct.root, 'etc/paygress-agent/provider.nsec'), 'utf8').trim()).data as Uint8Array);
    await until(async () => (await listening()) === 1, 60_000, 'agent listening');
    expect((await inside(['systemctl', 'is-enabled', UNIT])).stdout.trim()).toBe('enabled');
    const agent = await status(await mainPid());
    expect(field(agent, 'Uid')?.split(/\s+/)[0]).toBe((await inside(['id', '-u', 'paygress'])).stdout.trim());
    expect(field(agent, 'NoNewPrivs')).toBe('1');
    // The agent is the OOM killer's last choice: the unit's OOMScoreAdjust=-900,
    // which systemd can only apply where it holds CAP_SYS_RESOURCE (some
    // sandboxed CI machines, this one included, withhold it even from root).
    expect((await inside(['cat', `/proc/${await mainPid()}/oom_score_adj`])).stdout.trim()).toBe(hostMayLowerOomScore() ? '-900' : '0');
  }, 480_000);

  it('spawn → access details → ready; qemu runs as the service user under its own seccomp sandbox and goes first on OOM', async () => {
    // A tiny guest boots in seconds on an idle host; other tests' guests compete for the 2 cores here.
    const r = await consumer(['spawn', '--wait-ready'], relays[0], 360);
    expect(r.replies.map((x) => x.type), r.stderr).toEqual(['access_details', 'ready']);
    workload = r.replies[0]!.workload_id as string;
    const pid = qemuPid();
    const qemu = await status(pid);
    const uid = (await inside(['id', '-u', 'paygress'])).stdout.trim();
    expect(field(qemu, 'Uid')?.split(/\s+/)).toEqual([uid, uid, uid, uid]);
    expect(field(qemu, 'Seccomp')).toBe('2');
    // nspawn filters every process in the container; the unit's filter and
    // qemu's own -sandbox come on top of those.
    const pid1 = Number(field(await status(1), 'Seccomp_filters'));
    const agentFilters = Number(field(await status(await mainPid()), 'Seccomp_filters'));
    const qemuFilters = Number(field(qemu, 'Seccomp_filters'));
    expect(agentFilters).toBeGreaterThan(pid1);
    expect(qemuFilters).toBeGreaterThan(agentFilters);
    // The driver raises each qemu above the agent (drivers.kvm.guestOomScoreAdj, 500 by default).
    expect((await inside(['cat', `/proc/${pid}/oom_score_adj`])).stdout.trim()).toBe('500');
    const tasks = await inside(['systemctl', 'show', '-p', 'TasksCurrent', '-p', 'TasksMax', UNIT]);
    console.log(`[systemd-real] one tiny TCG VM + agent: ${tasks.stdout.replace(/\n/g, ' ')}; qemu threads ${field(qemu, 'Threads')}, agent threads ${field(await status(await mainPid()), 'Threads')}`);
  }, 480_000);

  it('systemctl restart with the VM running: qemu survives, the new agent re-adopts it (status answers)', async () => {
    const pid = qemuPid();
    const before = await mainPid();
    await sh(`systemctl restart ${UNIT}`);
    await until(async () => (await listening()) === 2, 60_000, 'agent listening again');
    expect(await mainPid()).not.toBe(before);
    expect(await alive(pid)).toBe(true);
    const r = await consumer(['status', workload]);
    expect(r.replies[0]?.type, r.stderr).toBe('status');
    expect(r.replies[0]?.state).toBe('running');
  }, 480_000);

  it('systemctl reload applies limits and relays live, reports restart-only fields, keeps the old config when the new one is bad', async () => {
    const before = await mainPid();
    const next = structuredClone(config);
    next.relays = [relays[0], relays[1]];
    next.plans = [...config.plans, { ...config.plans[0], id: 'second', name: 'Second' }];
    next.limits = { maxVms: 1 };
    next.logLevel = 'debug';
    next.stateDir = '/var/lib/paygress-agent-elsewhere';
    writeConfig(next);
    await sh(`systemctl reload ${UNIT}`);
    await until(async () => (await journal()).includes('config reloaded'), 30_000, 'config reloaded');
    const log = await journal();
    expect(log).toMatch(/config reloaded: .*limits\.maxVms.*plans.*relays/);
    expect(log).toMatch(/config reload: stateDir changed but needs a restart; kept as running/);
    expect(await mainPid()).toBe(before);
    // Through the relay that was just added, for the plan that was just added
    // (else `unknown_plan`): the new limit already holds (one VM runs).
    const refused = await consumer(['spawn', '--plan', 'second'], relays[1], 60);
    expect(refused.replies[0]?.type, refused.stderr).toBe('error');
    expect(refused.replies[0]?.code).toBe('capacity_exhausted');

    const bad = structuredClone(next);
    bad.limits = { maxVms: 0 };
    writeConfig(bad);
    await sh(`systemctl reload ${UNIT}`);
    await until(async () => (await journal()).includes('config reload refused'), 30_000, 'config reload refused');
    expect(await journal()).toMatch(/config reload refused, keeping the running config: .*limits\.maxVms/);
    expect((await inside(['systemctl', 'is-active', UNIT])).stdout.trim()).toBe('active');
    const still = await consumer(['spawn'], relays[1], 60);
    expect(still.replies[0]?.code, still.stderr).toBe('capacity_exhausted');
    writeConfig(config);
  }, 480_000);

  it('systemctl stop leaves qemu running; after start the VM is re-adopted and a stop DM ends it', async () => {
    const pid = qemuPid();
    await sh(`systemctl stop ${UNIT}`);
    expect((await inside(['systemctl', 'is-active', UNIT])).stdout.trim()).toBe('inactive');
    expect(await alive(pid)).toBe(true);
    const n = await listening();
    await sh(`systemctl start ${UNIT}`);
    await until(async () => (await listening()) === n + 1, 60_000, 'agent listening after start');
    const r = await consumer(['stop', workload]);
    expect(r.replies[0]?.type, r.stderr).toBe('stopped');
    await until(async () => !(await alive(pid)), 30_000, 'qemu gone');
  }, 480_000);
});
