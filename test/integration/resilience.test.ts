/**
 * Fault injection with real parts: relays that go away, an agent that is
 * killed or restarted, qemu processes that die, leases that run out.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { generateSecretKey } from 'nostr-tools';
import { ConsumerClient, type ReplyMessage } from '../../src/client/consumer.js';
import { sealDmRequest } from '../../src/nostr/dm.js';
import { startRelay, type LocalRelay } from '../support/relay.js';
import { ensureTinyGuest } from '../support/tiny-guest.js';
import { startAgentProcess, type AgentProcess, type GuestPaths } from '../support/agent-process.js';
import { isFree, processRuns, qemuPidsMatching, until } from '../support/net.js';

const PASSWORD = 'resilience test password';
const PORTS = { from: 43200, to: 43239 };

let guest: GuestPaths;
const relays: LocalRelay[] = [];
const agents: AgentProcess[] = [];
const clients: ConsumerClient[] = [];

beforeAll(async () => {
  guest = await ensureTinyGuest();
});

afterEach(async () => {
  await Promise.all(clients.splice(0).map((c) => c.close()));
  // Stop every VM a test left (through its lease), then the agents and relays.
  for (const a of agents.splice(0)) {
    if (a.proc.exitCode === null) await a.stop();
    // Every qemu of this agent names its VM root in its argv: one /proc scan.
    for (const pid of qemuPidsMatching(a.vmRoot)) process.kill(pid, 'SIGKILL');
  }
  await Promise.all(relays.splice(0).map((r) => r.stop()));
});

afterAll(async () => {
  expect(qemuPidsMatching('paygress-w-')).toEqual([]);
});

async function relay(): Promise<LocalRelay> {
  const r = await startRelay();
  relays.push(r);
  return r;
}

async function agent(opts: Partial<Parameters<typeof startAgentProcess>[0]> & { relays: string[] }): Promise<AgentProcess> {
  const a = await startAgentProcess({ guest, portRange: PORTS, ...opts });
  agents.push(a);
  return a;
}

async function client(a: AgentProcess, urls: string[], sk = generateSecretKey()): Promise<ConsumerClient> {
  const c = new ConsumerClient({ sk, provider: a.pubkey, relays: urls });
  await c.start();
  clients.push(c);
  return c;
}

function leaseIds(a: AgentProcess): string[] {
  const dir = join(a.stateDir, 'leases');
  return existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith('.json')).map((f) => f.replace(/\.json$/, '')) : [];
}

function vmDirs(a: AgentProcess): string[] {
  return existsSync(a.vmRoot) ? readdirSync(a.vmRoot) : [];
}

function pidOf(a: AgentProcess, id: string): number {
  return Number(readFileSync(join(a.vmRoot, id, 'qemu.pid'), 'utf8'));
}

/** Collect every reply the client sees. */
function collect(c: ConsumerClient): ReplyMessage[] {
  const seen: ReplyMessage[] = [];
  c.onReply((r) => seen.push(r));
  return seen;
}

describe('relay outages', () => {
  it('answers every request sent while its relay was down, exactly once', async () => {
    const r1 = await relay();
    const a = await agent({ relays: [r1.url] });
    await r1.stop();
    // The consumer publishes straight to the relay once it is back: its own
    // pool queues the events and sends them on reconnect.
    const c = new ConsumerClient({ sk: generateSecretKey(), provider: a.pubkey, relays: [r1.url] });
    clients.push(c);
    const replies = collect(c);
    c.start().catch(() => undefined);
    // publish() gives up waiting for an OK after a few seconds but keeps the
    // event queued and sends it when the relay is back.
    await Promise.all(Array.from({ length: 10 }, () => c.send({ type: 'spawn', root_password: PASSWORD }).catch(() => '')));
    await r1.start();
    await until(() => new Set(replies.map((r) => r.request_id)).size >= 10, 60_000, '10 replies');
    // Give duplicates a chance to show up before counting.
    await new Promise((r) => setTimeout(r, 3000));
    const perRequest = new Map<string, number>();
    for (const r of replies) perRequest.set(r.request_id as string, (perRequest.get(r.request_id as string) ?? 0) + 1);
    expect(perRequest.size).toBe(10);
    expect([...perRequest.values()].every((n) => n === 1)).toBe(true);
    expect(replies.filter((r) => r.type !== 'access_details')).toEqual([]);
    expect(leaseIds(a)).toHaveLength(10);
    for (const r of [...replies]) {
      expect(await c.request({ type: 'stop', workload_id: r.workload_id }, { timeoutMs: 30_000 })).toMatchObject({ type: 'stopped' });
    }
    expect(vmDirs(a)).toEqual([]);
  });

  it('the same wrap published on three relays makes exactly one VM', async () => {
    const rs = [await relay(), await relay(), await relay()];
    const a = await agent({ relays: rs.map((r) => r.url) });
    const c = await client(a, rs.map((r) => r.url));
    const { event, requestId } = sealDmRequest({
      sk: generateSecretKey(),
      recipient: a.pubkey,
      content: JSON.stringify({ type: 'spawn', root_password: PASSWORD }),
      channel: 'nip17',
    });
    await c.publishEvent(event); // the client's pool sends it to all three
    await until(() => leaseIds(a).length === 1, 30_000, 'one lease');
    await new Promise((r) => setTimeout(r, 3000));
    expect(leaseIds(a)).toHaveLength(1);
    expect(vmDirs(a)).toHaveLength(1);
    expect(a.output().match(new RegExp(`"requestId":"${requestId}"[^\\n]*"msg":"request"`, 'g'))).toHaveLength(1);
  });
});

describe('replies no relay accepted', () => {
  it('are spooled, survive a crash of the agent, and are delivered once after the restart', async () => {
    const r = await relay();
    const a = await agent({ relays: [r.url] });
    // NIP-04 replies are signed by the agent's own key: the relay's write
    // policy can refuse exactly those.
    const c = new ConsumerClient({ sk: generateSecretKey(), provider: a.pubkey, relays: [r.url], channel: 'nip04' });
    await c.start();
    clients.push(c);
    const replies = collect(c);
    r.blockAuthors.add(a.pubkey);
    const requestId = await c.send({ type: 'status', workload_id: 'w-000000000000' });
    await a.waitForLog(/no relay accepted the message; will retry/);
    expect(readdirSync(join(a.stateDir, 'outbox'))).toHaveLength(1);
    await a.kill(); // a crash: nothing flushed on the way out

    r.blockAuthors.delete(a.pubkey);
    const b = await agent({ relays: [r.url], root: a.root, sk: a.sk });
    await until(() => replies.some((x) => x.request_id === requestId), 30_000, 'the spooled reply');
    await new Promise((res) => setTimeout(res, 1500));
    expect(replies.filter((x) => x.request_id === requestId)).toEqual([
      expect.objectContaining({ type: 'error', code: 'not_found', request_id: requestId }),
    ]);
    await until(() => readdirSync(join(b.stateDir, 'outbox')).length === 0, 10_000, 'an empty spool');
  });
});

describe('agent restarts and crashes', () => {
  it('a guest still booting when the agent restarts still gets its ready notice', async () => {
    const r = await relay();
    const a = await agent({ relays: [r.url] });
    const c = await client(a, [r.url]);
    const replies = collect(c);
    const s = await c.request({ type: 'spawn', root_password: PASSWORD }, { timeoutMs: 60_000 });
    await a.stop(); // the tiny guest needs ~8 s to its banner: the watch is cut short
    expect(replies.some((x) => x.type === 'ready')).toBe(false);
    const b = await agent({ relays: [r.url], root: a.root, sk: a.sk });
    await until(() => replies.some((x) => x.type === 'ready' && x.workload_id === s.workload_id), 90_000, 'ready after the restart');
    // Recorded once a relay took the notice, so the next restart does not watch again.
    const readyAt = () => JSON.parse(readFileSync(join(b.stateDir, 'leases', `${s.workload_id}.json`), 'utf8')).readyAt;
    await until(() => typeof readyAt() === 'string', 10_000, 'readyAt in the lease');
    expect(await c.request({ type: 'stop', workload_id: s.workload_id }, { timeoutMs: 30_000 })).toMatchObject({ type: 'stopped' });
  });

  it('re-adopts live VMs after a restart; stop and status still work', async () => {
    const r = await relay();
    const a = await agent({ relays: [r.url] });
    const c = await client(a, [r.url]);
    const spawned: ReplyMessage[] = [];
    for (let i = 0; i < 3; i++) spawned.push(await c.request({ type: "spawn", root_password: PASSWORD }, { timeoutMs: 60_000 }));
    const pids = spawned.map((s) => pidOf(a, s.workload_id as string));
    await a.stop();
    expect(pids.every((p) => processRuns(p))).toBe(true); // VMs outlive the agent

    const b = await agent({ relays: [r.url], root: a.root, sk: a.sk });
    for (const s of spawned) await b.waitForLog(new RegExp(`"workloadId":"${s.workload_id}".*re-adopted`));
    expect(pids.every((p) => processRuns(p))).toBe(true);
    const st = await c.request({ type: "status", workload_id: spawned[0]!.workload_id }, { timeoutMs: 30_000 });
    expect(st).toMatchObject({ type: 'status', state: 'running', ssh_port: spawned[0]!.ssh_port });
    for (const s of spawned) {
      expect(await c.request({ type: 'stop', workload_id: s.workload_id }, { timeoutMs: 30_000 })).toMatchObject({ type: 'stopped' });
    }
    expect(pids.some((p) => processRuns(p))).toBe(false);
    expect(vmDirs(b)).toEqual([]);
  });

  it('after a SIGKILL mid-spawn, the next start leaves no orphan and answers the request', async () => {
    const r = await relay();
    const a = await agent({ relays: [r.url] });
    const c = await client(a, [r.url]);
    const replies = collect(c);
    const requestId = await c.send({ type: 'spawn', root_password: PASSWORD });
    await a.waitForLog(/disk overlay created/);
    await a.kill();

    const b = await agent({ relays: [r.url], root: a.root, sk: a.sk });
    await until(() => replies.some((x) => x.request_id === requestId), 30_000, 'an answer to the interrupted spawn');
    const answer = replies.find((x) => x.request_id === requestId)!;
    if (answer.type === 'access_details') {
      // The spawn had finished before the kill: the VM is real and leased.
      expect(leaseIds(b)).toEqual([answer.workload_id]);
      expect(processRuns(pidOf(b, answer.workload_id as string))).toBe(true);
    } else {
      expect(answer).toMatchObject({ type: 'error', code: 'spawn_failed' });
      expect(vmDirs(b)).toEqual([]);
      expect(leaseIds(b)).toEqual([]);
      expect(qemuPidsMatching(b.vmRoot)).toEqual([]);
    }
    expect(readdirSync(join(b.stateDir, 'inflight'))).toEqual([]);
  });
});

describe('lease supervision', () => {
  it('a qemu killed from outside closes the lease, tells the owner, frees port and directory', async () => {
    const r = await relay();
    const a = await agent({ relays: [r.url], overrides: { leases: { checkIntervalMs: 500 } } });
    const c = await client(a, [r.url]);
    const replies = collect(c);
    let s: ReplyMessage | undefined;
    // Killed after it booted: a VM dying during boot is a `boot_failed` instead (tested in cloud-guest.test.ts).
    const ready = await c.request(
      { type: 'spawn', root_password: PASSWORD },
      { timeoutMs: 120_000, done: (r) => r.type === 'ready', onProgress: (r) => (s ??= r) },
    );
    expect(ready.type).toBe('ready');
    const id = ready.workload_id as string;
    process.kill(pidOf(a, id), 'SIGKILL');
    await until(() => replies.some((x) => x.type === 'workload_lost' && x.workload_id === id), 30_000, 'workload_lost notice');
    expect(replies.filter((x) => x.workload_id === id).map((x) => x.type)).toEqual(['access_details', 'ready', 'workload_lost']);
    expect(leaseIds(a)).toEqual([]);
    expect(vmDirs(a)).toEqual([]);
    expect(await isFree(s!.ssh_port as number)).toBe(true);
  });

  it('a qemu killed during boot is reported once, as boot_failed, and everything is freed', async () => {
    const r = await relay();
    const a = await agent({ relays: [r.url], overrides: { leases: { checkIntervalMs: 200 } } });
    const c = await client(a, [r.url]);
    const replies = collect(c);
    const s = await c.request({ type: 'spawn', root_password: PASSWORD }, { timeoutMs: 60_000 });
    const id = s.workload_id as string;
    process.kill(pidOf(a, id), 'SIGKILL'); // long before the tiny guest's banner
    await until(() => replies.some((x) => x.type === 'boot_failed' && x.workload_id === id), 30_000, 'boot_failed notice');
    await new Promise((res) => setTimeout(res, 1500)); // room for a wrong second notice
    expect(replies.filter((x) => x.workload_id === id).map((x) => x.type)).toEqual(['access_details', 'boot_failed']);
    expect(replies.find((x) => x.type === 'boot_failed')).toMatchObject({ reason: 'died' });
    expect(leaseIds(a)).toEqual([]);
    expect(vmDirs(a)).toEqual([]);
    expect(await isFree(s.ssh_port as number)).toBe(true);
  });

  it('a lease of a few seconds ends with the VM gone and an expiry DM', async () => {
    const r = await relay();
    const a = await agent({
      relays: [r.url],
      overrides: {
        leases: { checkIntervalMs: 500, warnBeforeSeconds: 2 },
        plans: [{ id: 'tiny', name: 'Tiny', vcpus: 1, memoryMb: 256, diskGb: 2, durationSeconds: 4 }],
      },
    });
    const c = await client(a, [r.url]);
    const replies = collect(c);
    const s = await c.request({ type: 'spawn', root_password: PASSWORD }, { timeoutMs: 60_000 });
    const id = s.workload_id as string;
    const pid = pidOf(a, id);
    await until(() => replies.some((x) => x.type === 'expired' && x.workload_id === id), 30_000, 'expired notice');
    expect(replies.some((x) => x.type === 'expiring' && x.workload_id === id)).toBe(true);
    expect(processRuns(pid)).toBe(false);
    expect(vmDirs(a)).toEqual([]);
    expect(leaseIds(a)).toEqual([]);
  });
});
