/**
 * The warm pool end to end: the real agent process, the KVM driver, cloud
 * guests with qemu-guest-agent, a relay on 127.0.0.1. One agent and one
 * pool live through the file, in order: filled to two, two tenants served
 * from it (root login with the DM's password and key right after `ready`;
 * nothing of the first tenant reaches the second), exhausted (busy, then
 * cold), the refill's VM killed and replaced, the agent SIGKILLed and
 * restarted with a pool of one (no pool VM of the old run left, the pool
 * back to N), a clean stop. Only three boots are waited for: on a machine
 * busy with other guests each can take minutes.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { appendFileSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { generateSecretKey } from 'nostr-tools';
import { ConsumerClient, type ReplyMessage } from '../../src/client/consumer.js';
import { startRelay, type LocalRelay } from '../support/relay.js';
import { ensureCloudGuest, type CloudGuest } from '../support/cloud-guest.js';
import { startAgentProcess, type AgentProcess } from '../support/agent-process.js';
import { processRuns, qemuPidsMatching, until } from '../support/net.js';

const PORTS = { from: 47600, to: 47619 };
const POOL = 2;
/** A pool VM's boot under TCG on a loaded 2-core machine (it runs at guestNice like every guest). */
const BOOT_MS = 900_000;
const PASSWORD_A = 'first tenant: p#ss "w0rd"';
const PASSWORD_B = 'second tenant pass phrase';

let relay: LocalRelay;
let guest: CloudGuest;
let agent: AgentProcess;
let keyDir: string;
const clients: ConsumerClient[] = [];
const roots = new Set<string>();

beforeAll(async () => {
  relay = await startRelay();
  guest = await ensureCloudGuest();
  keyDir = mkdtempSync(join(tmpdir(), 'pga-pool-keys-'));
  await execa('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'tenant@pool-test', '-f', join(keyDir, 'id')]);
}, 30 * 60_000);

afterAll(async () => {
  await Promise.all(clients.map((c) => c.close()));
  if (agent?.proc.exitCode === null) await agent.stop();
  for (const root of roots) for (const pid of qemuPidsMatching(root)) process.kill(pid, 'SIGKILL');
  await relay?.stop();
});

function config(whenPoolEmpty: 'cold' | 'busy', warmPool = POOL): Record<string, unknown> {
  return {
    plans: [{ id: 'warm', name: 'Warm', description: 'pooled cloud guest', vcpus: 1, memoryMb: 768, diskGb: 4, durationSeconds: 3600, warmPool, whenPoolEmpty }],
    defaultPlan: 'warm',
    drivers: { kvm: { readyTimeoutMs: BOOT_MS } },
  };
}

async function start(root?: string, warmPool = POOL): Promise<AgentProcess> {
  const a = await startAgentProcess({
    relays: [relay.url],
    guest,
    portRange: PORTS,
    overrides: config('cold', warmPool),
    ...(root ? { root, sk: agent.sk } : {}),
  });
  roots.add(a.root);
  // A slow pool under a loaded machine is easier to follow from outside the test.
  a.proc.all?.on('data', (chunk: Buffer) => appendFileSync(join(a.root, 'agent.log'), chunk));
  return a;
}

async function client(): Promise<ConsumerClient> {
  const c = new ConsumerClient({ sk: generateSecretKey(), provider: agent.pubkey, relays: [relay.url] });
  await c.start();
  clients.push(c);
  return c;
}

/** JSON log lines of the agent whose `msg` is `msg`. */
function logLines(a: AgentProcess, msg: string): Array<Record<string, unknown>> {
  return a
    .output()
    .split('\n')
    .filter((l) => l.includes(`"${msg}"`))
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((l) => l.msg === msg);
}

/** Pool VMs ready and not yet handed off, as the agent's log tells. */
function idlePool(a: AgentProcess): string[] {
  const handed = new Set(logLines(a, 'pool VM handed off').map((l) => l.workloadId));
  const gone = new Set([...logLines(a, 'pool VM died while idle; replaced'), ...logLines(a, 'hand-off failed; the VM is destroyed')].map((l) => l.workloadId));
  return logLines(a, 'pool VM ready')
    .map((l) => l.workloadId as string)
    .filter((id) => !handed.has(id) && !gone.has(id));
}

async function poolFilled(a: AgentProcess, n = POOL): Promise<string[]> {
  await until(() => idlePool(a).length >= n, n * BOOT_MS, `${n} idle pool VMs`);
  return idlePool(a);
}

function ssh(port: number, auth: { password: string } | { key: string }, command: string) {
  const how =
    'password' in auth
      ? ['-o', 'PreferredAuthentications=password', '-o', 'PubkeyAuthentication=no']
      : ['-o', 'PreferredAuthentications=publickey', '-o', 'IdentitiesOnly=yes', '-i', auth.key];
  const argv = [
    'ssh',
    '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR', '-o', 'ConnectTimeout=20',
    ...how,
    '-p', String(port), 'root@127.0.0.1', command,
  ];
  // The password travels in the environment, never in argv.
  return 'password' in auth
    ? execa('sshpass', ['-e', ...argv], { env: { SSHPASS: auth.password }, reject: false, timeout: 60_000, stdin: 'ignore' })
    : execa(argv[0]!, argv.slice(1), { reject: false, timeout: 60_000, stdin: 'ignore' });
}

async function spawnPooled(c: ConsumerClient, password: string): Promise<{ access: ReplyMessage; ready: ReplyMessage; ms: number }> {
  const seen: ReplyMessage[] = [];
  const sent = Date.now();
  const ready = await c.request(
    { type: 'spawn', root_password: password, ssh_keys: [readFileSync(join(keyDir, 'id.pub'), 'utf8').trim()] },
    { timeoutMs: 120_000, done: (r) => r.type === 'ready' || r.type === 'boot_failed' || r.type === 'error', onProgress: (r) => seen.push(r) },
  );
  return { access: seen[0]!, ready, ms: Date.now() - sent };
}

/** Rewrite the running agent's plans and make it reload them. */
function setPlans(plans: unknown): void {
  writeFileSync(agent.configPath, JSON.stringify({ ...JSON.parse(readFileSync(agent.configPath, 'utf8')), plans }, null, 2));
  agent.proc.kill('SIGHUP');
}

const GUEST_FACTS = 'hostname; id -u; cat /etc/machine-id; cut -d" " -f2 /etc/ssh/ssh_host_ed25519_key.pub; ls /root';

describe('warm pool with cloud guests', () => {
  let tenantA: { id: string; port: number; machineId: string; hostKey: string };

  it('fills the pool, one VM after the other, to N', async () => {
    agent = await start();
    const idle = await poolFilled(agent);
    expect(idle).toHaveLength(POOL);
    expect(agent.output()).not.toContain('hand-off failed');
  }, 2 * BOOT_MS + 60_000);

  it('serves a spawn from the pool: ready right after the access details, root login with the DM\'s password and key', async () => {
    const idle = idlePool(agent);
    const c = await client();
    const { access, ready, ms } = await spawnPooled(c, PASSWORD_A);
    expect(access, JSON.stringify(access)).toMatchObject({ type: 'access_details', ssh_user: 'root' });
    expect(ready, JSON.stringify(ready)).toMatchObject({ type: 'ready', workload_id: access.workload_id });
    expect(idle).toContain(access.workload_id);
    const id = access.workload_id as string;
    const port = access.ssh_port as number;
    const handoff = logLines(agent, 'VM handed off').find((l) => l.workloadId === id);
    expect(handoff).toMatchObject({ phase: 'handoff', ms: expect.any(Number) });
    expect(logLines(agent, 'pool VM handed off').find((l) => l.workloadId === id)).toMatchObject({ plan: 'warm' });
    console.log(`pooled spawn: DM → ready ${ms} ms, hand-off ${handoff!.ms} ms`);

    const byPassword = await ssh(port, { password: PASSWORD_A }, `${GUEST_FACTS}; echo tenant-a-secret > /root/tenant-a`);
    expect(byPassword.exitCode, byPassword.stderr).toBe(0);
    const [hostname, uid, machineId, hostKey] = byPassword.stdout.split('\n');
    expect([hostname, uid]).toEqual([id, '0']);
    const byKey = await ssh(port, { key: join(keyDir, 'id') }, 'cat /root/tenant-a');
    expect(byKey.exitCode, byKey.stderr).toBe(0);
    expect(byKey.stdout).toBe('tenant-a-secret');
    expect((await ssh(port, { password: `${PASSWORD_A}x` }, 'true')).exitCode).not.toBe(0);
    tenantA = { id, port, machineId: machineId!, hostKey: hostKey! };
  }, 300_000);

  it('gives a second tenant another VM: nothing of the first tenant, its own machine-id and host keys', async () => {
    const c = await client();
    const { access, ready } = await spawnPooled(c, PASSWORD_B);
    expect(ready, JSON.stringify(ready)).toMatchObject({ type: 'ready' });
    expect(access.workload_id).not.toBe(tenantA.id);
    const out = await ssh(access.ssh_port as number, { password: PASSWORD_B }, GUEST_FACTS);
    expect(out.exitCode, out.stderr).toBe(0);
    const [hostname, , machineId, hostKey, ...files] = out.stdout.split('\n');
    expect(hostname).toBe(access.workload_id);
    expect(machineId).not.toBe(tenantA.machineId);
    expect(hostKey).not.toBe(tenantA.hostKey);
    expect(files).not.toContain('tenant-a');
    // The first tenant's password opens neither this VM nor its root account.
    expect((await ssh(access.ssh_port as number, { password: PASSWORD_A }, 'true')).exitCode).not.toBe(0);
  }, 300_000);

  it('exhausted: busy when the plan says so, a cold boot by default', async () => {
    // Both pool VMs are taken and the refill has just begun: the pool is empty now.
    expect(idlePool(agent)).toEqual([]);
    setPlans(config('busy').plans);
    await agent.waitForLog(/config reloaded: plans/);
    const c = await client();
    const busy = await c.request({ type: 'spawn', root_password: PASSWORD_B }, { timeoutMs: 60_000 });
    expect(busy).toMatchObject({ type: 'error', code: 'busy' });

    setPlans(config('cold').plans);
    await until(() => logLines(agent, 'config reloaded: plans').length >= 2, 20_000, 'the second reload');
    const cold = await c.request({ type: 'spawn', root_password: PASSWORD_B }, { timeoutMs: 60_000 });
    expect(cold).toMatchObject({ type: 'access_details' });
    // The agent's line (the driver's `start` phase line has the same text).
    expect(logLines(agent, 'workload started').find((l) => l.workloadId === cold.workload_id && 'pooled' in l)).toMatchObject({ pooled: false });
    expect(await c.request({ type: 'stop', workload_id: cold.workload_id as string }, { timeoutMs: 60_000 })).toMatchObject({ type: 'stopped' });
  }, 120_000);

  it('replaces a pool VM whose qemu is killed', async () => {
    // The refill after the two hand-offs is booting one now.
    const booted = () => logLines(agent, 'pool VM booting').map((l) => l.workloadId as string).filter((id) => !idlePool(agent).includes(id));
    await until(() => booted().length >= 3, 120_000, 'the refill to start');
    const victim = booted().at(-1)!;
    const pid = Number(readFileSync(join(agent.vmRoot, victim, 'qemu.pid'), 'utf8'));
    process.kill(pid, 'SIGKILL');
    await until(() => logLines(agent, 'pool VM died while booting; destroyed').some((l) => l.workloadId === victim), 120_000, 'the dead VM noticed');
    await until(() => !processRuns(pid), 10_000, 'the killed qemu gone');
    // Replaced after the backoff by a VM of its own.
    await until(() => booted().length >= 4, 120_000, 'a replacement booting');
    expect(booted().at(-1)).not.toBe(victim);
    expect(qemuPidsMatching(join(agent.vmRoot, victim))).toEqual([]);
  }, 360_000);

  it('after a SIGKILL of the agent: no pool VM of the old run is left, the tenants stay, the pool is back to N', async () => {
    const oldPool = logLines(agent, 'pool VM booting').map((l) => l.workloadId as string);
    const tenants = logLines(agent, 'pool VM handed off').map((l) => l.workloadId as string);
    expect(tenants).toHaveLength(2);
    await agent.kill();
    // Restarted with a pool of one: the next boot is the last one this file waits for.
    agent = await start(agent.root, 1);
    const idle = await poolFilled(agent, 1);
    for (const id of oldPool.filter((id) => !tenants.includes(id))) {
      expect(qemuPidsMatching(join(agent.vmRoot, id)), `old pool VM ${id}`).toEqual([]);
    }
    expect(oldPool).not.toContain(idle[0]);
    // The tenants' VMs were re-adopted and still take their logins.
    const login = await ssh(tenantA.port, { password: PASSWORD_A }, 'cat /root/tenant-a');
    expect(login.stdout).toBe('tenant-a-secret');
    // Exactly the tenants' and the pool's qemu run.
    expect(qemuPidsMatching(agent.vmRoot)).toHaveLength(tenants.length + 1);
  }, BOOT_MS + 120_000);

  it('a clean stop destroys the idle pool VMs and leaves the tenants running', async () => {
    const idle = idlePool(agent);
    await agent.stop();
    for (const id of idle) expect(qemuPidsMatching(join(agent.vmRoot, id))).toEqual([]);
    // Tenants A and B (the cold one was stopped).
    expect(qemuPidsMatching(agent.vmRoot)).toHaveLength(2);
    // Counted after the pool's VMs went: what the pool wanted, and that nothing is left of it.
    expect(logLines(agent, 'stats at shutdown')[0]).toMatchObject({ warmPool: { target: 1, ready: 0, booting: 0 } });
  }, 120_000);
});
