/**
 * Admission limits and secret hygiene against the real agent (child process),
 * a real relay and real qemu (tiny guest, TCG). Each limit is hit and answered
 * with its own code, and a refused spawn leaves no directory and no qemu.
 * While a spawn runs, no process's argv or environment holds the password,
 * and afterwards neither the log nor any file the agent wrote does.
 *
 * The tests run in order and share one agent: which VMs are live matters.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chmodSync, existsSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { generateSecretKey } from 'nostr-tools';
import { nsecEncode } from 'nostr-tools/nip19';
import { bytesToHex } from '@noble/hashes/utils.js';
import { ConsumerClient, NoReplyError, type ReplyMessage } from '../../src/client/consumer.js';
import { startRelay, type LocalRelay } from '../support/relay.js';
import { ensureTinyGuest } from '../support/tiny-guest.js';
import { startAgentProcess, type AgentProcess } from '../support/agent-process.js';
import { isFree, qemuPidsMatching, until } from '../support/net.js';
import { filesUnder } from '../support/files.js';

const PORTS = { from: 45020, to: 45029 };
const PASSWORD = `Pw-${bytesToHex(generateSecretKey()).slice(0, 16)}-"q'\\ ünï: #x`;
const RATE_BURST = 4;

let relay: LocalRelay;
let agent: AgentProcess;
const clients: ConsumerClient[] = [];
/** Workloads that should be running right now. */
const live = new Set<string>();

async function client(channel: 'nip17' | 'nip04' = 'nip17'): Promise<ConsumerClient> {
  const c = new ConsumerClient({ sk: generateSecretKey(), provider: agent.pubkey, relays: [relay.url], channel });
  await c.start();
  clients.push(c);
  return c;
}

const spawnReq = (extra: Record<string, unknown> = {}) => ({ type: 'spawn', root_password: PASSWORD, ...extra });
const ask = (c: ConsumerClient, req: Record<string, unknown> | string) => c.request(req, { timeoutMs: 60_000 });

/** Exactly the live workloads have a directory and a qemu process; nothing else. */
async function expectOnlyLive(): Promise<void> {
  const dirs = existsSync(agent.vmRoot) ? readdirSync(agent.vmRoot).filter((n) => !n.startsWith('.')) : [];
  expect(dirs.sort()).toEqual([...live].sort());
  expect(qemuPidsMatching(agent.vmRoot)).toHaveLength(live.size);
  expect(readdirSync(join(agent.stateDir, 'leases')).sort()).toEqual([...live].map((id) => `${id}.json`).sort());
  // A spawn's journal entry ends once a relay took its reply, which is about
  // when the consumer reads it: wait for that, not for a fixed moment.
  await until(() => readdirSync(join(agent.stateDir, 'inflight')).length === 0, 10_000, 'every spawn journal entry ended');
}

async function expectRefused(reply: ReplyMessage, code: string): Promise<void> {
  expect(reply).toMatchObject({ type: 'error', code });
  expect(JSON.stringify(reply)).not.toContain(PASSWORD);
  await expectOnlyLive();
}

beforeAll(async () => {
  const guest = await ensureTinyGuest();
  relay = await startRelay();
  agent = await startAgentProcess({
    relays: [relay.url],
    guest,
    portRange: PORTS,
    overrides: {
      plans: [
        { id: 'tiny', name: 'Tiny', vcpus: 1, memoryMb: 256, diskGb: 2, durationSeconds: 3600 },
        { id: 'big', name: 'Big', vcpus: 1, memoryMb: 1024, diskGb: 2, durationSeconds: 3600 },
        { id: 'wide', name: 'Wide', vcpus: 4, memoryMb: 256, diskGb: 2, durationSeconds: 3600 },
      ],
      limits: {
        maxContentBytes: 2048,
        // One token a minute: nothing refills while a test runs, so counts are exact.
        ratePerMinute: 1,
        rateBurst: RATE_BURST,
        maxVmsPerSender: 1,
        maxVms: 2,
        maxSpawnsInFlight: 1,
        hostCapacity: { vcpus: 2, memoryMb: 1000 },
      },
    },
  });
});

afterAll(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await agent?.stop();
  // Anything a failed test left running is killed here, not left to the next file.
  for (const pid of qemuPidsMatching(agent?.vmRoot ?? '/nonexistent')) process.kill(pid, 'SIGKILL');
  await relay?.stop();
});

describe('admission limits, each with its code', () => {
  it('content over maxContentBytes: invalid_request, over both channels', async () => {
    for (const channel of ['nip17', 'nip04'] as const) {
      const c = await client(channel);
      await expectRefused(await ask(c, spawnReq({ pad: 'z'.repeat(3000) })), 'invalid_request');
    }
  });

  it('resources above the plan: exceeds_plan', async () => {
    const c = await client();
    await expectRefused(await ask(c, spawnReq({ memory_mb: 512 })), 'exceeds_plan');
    await expectRefused(await ask(c, spawnReq({ plan: 'wide', vcpus: 5 })), 'exceeds_plan');
  });

  it('a sender over its rate: rate_limited once, then silence; a limited spawn creates nothing', async () => {
    const c = await client('nip04');
    const status = { type: 'status', workload_id: 'w-000000000000' };
    // The burst is served (the stop/status path counts too)...
    const served = await Promise.all(Array.from({ length: RATE_BURST }, () => ask(c, status)));
    expect(served.map((r) => r.code)).toEqual(Array(RATE_BURST).fill('not_found'));
    // ...the next request, a spawn, is refused before it can cost anything...
    await expectRefused(await ask(c, spawnReq()), 'rate_limited');
    // ...and the rest of the flood gets no reply at all (no amplification).
    await expect(c.request(status, { timeoutMs: 3000 })).rejects.toBeInstanceOf(NoReplyError);
    // Other keys are not affected.
    expect(await ask(await client(), status)).toMatchObject({ code: 'not_found' });
    expect(agent.output()).toMatch(/request refused: rate_limited/);
  });

  it('spawns in flight over maxSpawnsInFlight: busy', async () => {
    const senders = await Promise.all([client(), client(), client()]);
    const replies = await Promise.all(senders.map((c) => ask(c, spawnReq())));
    const ok = replies.filter((r) => r.type === 'access_details');
    expect(replies.map((r) => r.code ?? r.type).sort()).toEqual(['access_details', 'busy', 'busy']);
    live.add(ok[0]!.workload_id as string);
    await expectOnlyLive();
    // The one that got through is the sender that now holds a workload.
    const owner = senders[replies.indexOf(ok[0]!)]!;
    // Same sender again: quota_exceeded.
    await expectRefused(await ask(owner, spawnReq()), 'quota_exceeded');
  });

  it('committed RAM and vCPU above host capacity: capacity_exhausted', async () => {
    // 256 MB live + 1024 asked > 1000.
    const ram = await ask(await client(), spawnReq({ plan: 'big' }));
    await expectRefused(ram, 'capacity_exhausted');
    expect(ram.message).toMatch(/memory/);
    // 1 vCPU live + 4 asked > 2.
    const cpu = await ask(await client(), spawnReq({ plan: 'wide' }));
    await expectRefused(cpu, 'capacity_exhausted');
    expect(cpu.message).toMatch(/vCPU/);
  });

  it('while a spawn runs, no process argv or environment holds the password or the provider key; ids are the agent’s own', async () => {
    const c = await client();
    const skHex = bytesToHex(agent.sk);
    const nsec = nsecEncode(agent.sk);
    const needles = [PASSWORD, skHex, nsec];
    // Distinctive values: qemu's own argv legitimately holds `-daemonize` and friends.
    const hostile = ['../../../tmp/pwn', '-drive=file=/etc/shadow,evil', '--evil-option', '/etc/passwd-evil'];
    const seenCmdlines = new Set<string>();
    const hits = new Set<string>();
    let polls = 0;
    let done = false;
    // Poll /proc as fast as it goes for as long as the spawn takes.
    const poller = (async () => {
      while (!done) {
        polls++;
        for (const pid of readdirSync('/proc')) {
          if (!/^\d+$/.test(pid)) continue;
          for (const what of ['cmdline', 'environ']) {
            let text: string;
            try {
              text = readFileSync(`/proc/${pid}/${what}`, 'utf8');
            } catch {
              continue;
            }
            if (what === 'cmdline' && text.includes(agent.root)) seenCmdlines.add(text.split('\0')[0]!);
            for (const n of needles) if (text.includes(n)) hits.add(`${pid} ${what}`);
            if (what === 'cmdline' && text.includes(agent.root)) for (const h of hostile) if (text.includes(h)) hits.add(`${pid} hostile ${h}`);
          }
        }
        await new Promise((r) => setImmediate(r));
      }
    })();
    const reply = await ask(c, spawnReq({ hostname: hostile[0], workload_id: '../../etc', id: hostile[1], name: hostile[2], path: hostile[3] }));
    // A little longer: the VM keeps running, and late children (readiness probes) count too.
    await new Promise((r) => setTimeout(r, 1500));
    done = true;
    await poller;

    expect(reply).toMatchObject({ type: 'access_details' });
    const id = reply.workload_id as string;
    expect(id).toMatch(/^w-[0-9a-f]{12}$/);
    live.add(id);
    await expectOnlyLive();
    expect(existsSync('/tmp/pwn')).toBe(false);
    // The poll really watched the spawn's processes.
    expect([...seenCmdlines].some((cmd) => cmd.includes('qemu-system'))).toBe(true);
    expect(polls).toBeGreaterThan(10);
    expect([...hits]).toEqual([]);

    // Nothing the agent wrote holds the password: not the log, not a state
    // file, not the VM directory (seed.iso, serial log, disk overlay).
    const forms = [PASSWORD, JSON.stringify(PASSWORD).slice(1, -1), Buffer.from(PASSWORD).toString('base64')];
    const output = agent.output();
    for (const f of forms) expect(output.includes(f)).toBe(false);
    expect(output.includes(skHex) || output.includes(nsec)).toBe(false);
    const files = [...filesUnder(agent.stateDir), ...filesUnder(agent.vmRoot)];
    expect(files.some((f) => f.endsWith('seed.iso'))).toBe(true);
    for (const file of files) {
      const bytes = readFileSync(file);
      for (const f of forms) expect(bytes.includes(Buffer.from(f)), `${file} holds the password`).toBe(false);
      expect(bytes.includes(Buffer.from(skHex)) || bytes.includes(Buffer.from(nsec)), `${file} holds the provider key`).toBe(false);
    }
    console.log(`secret scan: ${polls} /proc polls during the spawn, saw ${[...seenCmdlines].join(', ')}; ${files.length} files scanned`);
  });

  it('live workloads at maxVms: capacity_exhausted', async () => {
    expect(live.size).toBe(2);
    const r = await ask(await client(), spawnReq());
    await expectRefused(r, 'capacity_exhausted');
    expect(r.message).toMatch(/maximum number/);
  });

  it('stopping frees the room again, and everything is released', async () => {
    // Owners are gone from scope; the agent's lease files name them, but only an owner may stop.
    // Restart-free cleanup: stop via each owner recorded in the lease.
    const ports: number[] = [];
    for (const id of live) {
      const lease = JSON.parse(readFileSync(join(agent.stateDir, 'leases', `${id}.json`), 'utf8')) as { owner: string; sshPort: number };
      ports.push(lease.sshPort);
      const owner = clients.find((c) => c.pubkey === lease.owner)!;
      expect(await ask(owner, { type: 'stop', workload_id: id })).toMatchObject({ type: 'stopped' });
      live.delete(id);
    }
    await expectOnlyLive();
    for (const p of ports) expect(await isFree(p)).toBe(true);
    // The quota came back: a fresh spawn fits again.
    const c = await client();
    const again = await ask(c, spawnReq());
    expect(again).toMatchObject({ type: 'access_details' });
    expect(await ask(c, { type: 'stop', workload_id: again.workload_id })).toMatchObject({ type: 'stopped' });
    await expectOnlyLive();
    expect(agent.proc.exitCode).toBeNull();
  });
});

describe('provider key file', () => {
  it('the agent refuses to start with a key file group or others can read, and says why', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'pga-keymode-'));
    const keyFile = join(dir, 'provider.nsec');
    writeFileSync(keyFile, `${nsecEncode(generateSecretKey())}\n`, { mode: 0o600 });
    chmodSync(keyFile, 0o644);
    const cfg = JSON.parse(readFileSync(agent.configPath, 'utf8')) as Record<string, any>;
    cfg.provider.keyFile = keyFile;
    cfg.stateDir = join(dir, 'state');
    cfg.drivers.kvm.vmRoot = join(dir, 'vms');
    const configPath = join(dir, 'provider.json');
    writeFileSync(configPath, JSON.stringify(cfg));
    const cli = new URL('../../src/cli/agent.ts', import.meta.url).pathname;
    const r = await execa('node', ['--import', 'tsx', cli, 'run', '--allow-root', '--config', configPath], { reject: false, all: true, timeout: 30_000 });
    expect(r.exitCode).not.toBe(0);
    expect(r.all).toMatch(/0644/);
    expect(r.all).toMatch(/chmod 600/);
    expect(r.all).not.toMatch(/agent listening/);
  });
});
