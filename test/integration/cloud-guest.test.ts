/**
 * The whole promise with a real Debian cloud-init guest: the password the
 * consumer put in the DM is what opens the VM over SSH.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { execa } from 'execa';
import { generateSecretKey } from 'nostr-tools';
import { ConsumerClient, type ReplyMessage } from '../../src/client/consumer.js';
import { startRelay, type LocalRelay } from '../support/relay.js';
import { ensureCloudGuest } from '../support/cloud-guest.js';
import { ensureTinyGuest } from '../support/tiny-guest.js';
import { startAgentProcess, type AgentProcess } from '../support/agent-process.js';
import { isFree, processRuns, qemuPidsMatching } from '../support/net.js';
import { filesUnder } from '../support/files.js';

// Spaces, both quotes, a colon, '#', a backslash and non-ASCII: everything
// that breaks YAML or shell quoting when pasted instead of serialised.
const PASSWORD = `p a"s's: w#o\\rd-ünï ✓`;

let relay: LocalRelay;
const agents: AgentProcess[] = [];
const clients: ConsumerClient[] = [];

beforeAll(async () => {
  relay = await startRelay();
});

afterAll(async () => {
  await Promise.all(clients.map((c) => c.close()));
  for (const a of agents) {
    if (a.proc.exitCode === null) await a.stop();
    // Every qemu of this agent names its VM root in its argv: one /proc scan.
    for (const pid of qemuPidsMatching(a.vmRoot)) process.kill(pid, 'SIGKILL');
  }
  await relay?.stop();
});

async function client(a: AgentProcess): Promise<ConsumerClient> {
  const c = new ConsumerClient({ sk: generateSecretKey(), provider: a.pubkey, relays: [relay.url] });
  await c.start();
  clients.push(c);
  return c;
}

function ssh(port: number, password: string, command: string) {
  return execa(
    'sshpass',
    [
      '-e', 'ssh',
      '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR',
      '-o', 'PreferredAuthentications=password', '-o', 'PubkeyAuthentication=no', '-o', 'ConnectTimeout=20',
      '-p', String(port), 'root@127.0.0.1', command,
    ],
    // The password travels in the environment, never in argv.
    { env: { SSHPASS: password }, reject: false, timeout: 60_000, stdin: 'ignore' },
  );
}

describe('cloud-init guest', () => {
  it('spawn → access details → ready → root SSH login with exactly the DM password → stop', async () => {
    const guest = await ensureCloudGuest();
    const a = await startAgentProcess({
      relays: [relay.url],
      guest,
      portRange: { from: 43300, to: 43319 },
      overrides: { defaultPlan: 'cloud', drivers: { kvm: { readyTimeoutMs: 400_000 } } },
    });
    agents.push(a);
    const c = await client(a);

    const seen: ReplyMessage[] = [];
    const final = await c.request(
      { type: 'spawn', root_password: PASSWORD },
      { timeoutMs: 420_000, done: (r) => r.type === 'ready' || r.type === 'boot_failed', onProgress: (r) => seen.push(r) },
    );
    expect(seen[0]).toMatchObject({ type: 'access_details', ssh_user: 'root', host: '127.0.0.1' });
    expect(final, JSON.stringify(final)).toMatchObject({ type: 'ready', workload_id: seen[0]!.workload_id });
    const id = final.workload_id as string;
    const port = seen[0]!.ssh_port as number;

    const ok = await ssh(port, PASSWORD, 'hostname; id -u');
    expect(ok.exitCode, ok.stderr).toBe(0);
    expect(ok.stdout.split('\n')).toEqual([id, '0']);

    const wrong = await ssh(port, `${PASSWORD}x`, 'true');
    expect(wrong.exitCode).not.toBe(0);

    // The plaintext exists nowhere on the host: not in the seed, the overlay,
    // vm.json, leases, the seen log — and not in the agent's logs.
    const needle = Buffer.from(PASSWORD, 'utf8');
    const leaking = filesUnder(a.root).filter((f) => readFileSync(f).includes(needle));
    expect(leaking).toEqual([]);
    expect(a.output()).not.toContain(PASSWORD);

    const pid = Number(readFileSync(join(a.vmRoot, id, 'qemu.pid'), 'utf8'));
    expect(await c.request({ type: 'stop', workload_id: id }, { timeoutMs: 60_000 })).toMatchObject({ type: 'stopped' });
    expect(processRuns(pid)).toBe(false);
    expect(existsSync(join(a.vmRoot, id))).toBe(false);
    expect(await isFree(port)).toBe(true);
  }, 600_000);
});

describe('boot failure', () => {
  it('a guest that never boots yields boot_failed with its console output, and nothing is kept', async () => {
    const tiny = await ensureTinyGuest();
    const a = await startAgentProcess({
      relays: [relay.url],
      // A kernel command line with no init: the kernel panics and never serves SSH.
      guest: { ...tiny, append: 'console=ttyS0 rdinit=/nonexistent init=/nonexistent' },
      portRange: { from: 43320, to: 43329 },
      overrides: { drivers: { kvm: { readyTimeoutMs: 20_000 } } },
    });
    agents.push(a);
    const c = await client(a);
    const seen: ReplyMessage[] = [];
    const final = await c.request(
      { type: 'spawn', root_password: PASSWORD },
      { timeoutMs: 90_000, done: (r) => r.type === 'ready' || r.type === 'boot_failed', onProgress: (r) => seen.push(r) },
    );
    expect(seen[0]?.type).toBe('access_details');
    expect(final).toMatchObject({ type: 'boot_failed', reason: 'timeout', workload_id: seen[0]!.workload_id });
    expect(final.console).toMatch(/Kernel panic|init/i);
    expect(readdirSync(a.vmRoot)).toEqual([]);
    expect(readdirSync(join(a.stateDir, 'leases'))).toEqual([]);
    expect(await isFree(seen[0]!.ssh_port as number)).toBe(true);
  }, 120_000);
});
