/**
 * The first whole path, with real parts: a relay on 127.0.0.1, the agent CLI
 * as a child process, qemu under TCG booting the tiny guest, and the consumer
 * client sending encrypted DMs.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { finalizeEvent, generateSecretKey, getPublicKey, getEventHash } from 'nostr-tools';
import * as nip44 from 'nostr-tools/nip44';
import { ConsumerClient, type ReplyMessage } from '../../src/client/consumer.js';
import { startRelay, type LocalRelay } from '../support/relay.js';
import { ensureTinyGuest } from '../support/tiny-guest.js';
import { startAgentProcess, type AgentProcess } from '../support/agent-process.js';
import { isFree, isListening, processRuns } from '../support/net.js';
import { spawnPhasesOf, SPAWN_PHASES } from '../../bench/phases.js';

const PASSWORD = 'pa ss"wo\'rd: #with\\ünïcode';
const PORTS = { from: 43100, to: 43119 };

let relay: LocalRelay;
let agent: AgentProcess;
const clients: ConsumerClient[] = [];

async function client(channel: 'nip17' | 'nip04' = 'nip17', sk = generateSecretKey()): Promise<ConsumerClient> {
  const c = new ConsumerClient({ sk, provider: agent.pubkey, relays: [relay.url], channel });
  await c.start();
  clients.push(c);
  return c;
}

function pidOf(workloadId: string): number {
  return Number(readFileSync(join(agent.vmRoot, workloadId, 'qemu.pid'), 'utf8').trim());
}

async function expectRunning(reply: ReplyMessage): Promise<number> {
  const id = reply.workload_id as string;
  expect(existsSync(join(agent.vmRoot, id, 'qemu.pid'))).toBe(true);
  const pid = pidOf(id);
  expect(processRuns(pid, `paygress-${id}`)).toBe(true);
  expect(await isListening(reply.ssh_port as number)).toBe(true);
  return pid;
}

async function expectGone(id: string, pid: number, port: number): Promise<void> {
  expect(processRuns(pid)).toBe(false);
  expect(existsSync(join(agent.vmRoot, id))).toBe(false);
  expect(await isFree(port)).toBe(true);
}

beforeAll(async () => {
  const guest = await ensureTinyGuest();
  relay = await startRelay();
  agent = await startAgentProcess({ relays: [relay.url], guest, portRange: PORTS });
});

afterAll(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await agent?.stop();
  await relay?.stop();
});

describe.each(['nip17', 'nip04'] as const)('spawn and stop over %s', (channel) => {
  it('replies with host and port once qemu runs, and stop frees everything', async () => {
    const c = await client(channel);
    const reply = await c.request({ type: 'spawn', root_password: PASSWORD }, { timeoutMs: 60_000 });
    expect(reply).toMatchObject({
      type: 'access_details',
      host: '127.0.0.1',
      ssh_user: 'root',
      isolation_level: 'dedicated-host',
      plan: { id: 'tiny', vcpus: 1, memory_mb: 256, disk_gb: 2 },
    });
    expect(reply.workload_id).toMatch(/^w-[0-9a-f]{12}$/);
    expect(reply.ssh_port).toBeGreaterThanOrEqual(PORTS.from);
    expect(Date.parse(reply.expires_at as string)).toBeGreaterThan(Date.now());
    const pid = await expectRunning(reply);

    const stopped = await c.request({ type: 'stop', workload_id: reply.workload_id }, { timeoutMs: 30_000 });
    expect(stopped).toMatchObject({ type: 'stopped', workload_id: reply.workload_id });
    await expectGone(reply.workload_id as string, pid, reply.ssh_port as number);
  });
});

describe('ownership', () => {
  it('answers not_found to any other key and leaves the VM alone', async () => {
    const owner = await client();
    const stranger = await client();
    const reply = await owner.request({ type: 'spawn', root_password: PASSWORD }, { timeoutMs: 60_000 });
    const id = reply.workload_id as string;
    const pid = await expectRunning(reply);

    for (const type of ['stop', 'status']) {
      const r = await stranger.request({ type, workload_id: id }, { timeoutMs: 30_000 });
      expect(r).toMatchObject({ type: 'error', code: 'not_found' });
    }
    // An id that exists nowhere gets the very same answer: no hint either way.
    const none = await stranger.request({ type: 'status', workload_id: 'w-000000000000' }, { timeoutMs: 30_000 });
    expect(none).toMatchObject({ type: 'error', code: 'not_found', message: 'no workload w-000000000000 for this key' });
    expect(processRuns(pid)).toBe(true);

    const status = await owner.request({ type: 'status', workload_id: id }, { timeoutMs: 30_000 });
    expect(status).toMatchObject({ type: 'status', state: 'running', ssh_port: reply.ssh_port });
    expect(status.seconds_left).toBeGreaterThan(3000);

    await owner.request({ type: 'stop', workload_id: id }, { timeoutMs: 30_000 });
    await expectGone(id, pid, reply.ssh_port as number);
  });
});

describe('bad input', () => {
  // NIP-44 (and so NIP-17) cannot carry more than 64 KiB of plaintext, and
  // relays cap event size: the oversize case travels as NIP-04, as a hostile
  // client would send it.
  const cases: Array<[string, string, 'nip17' | 'nip04']> = [
    ['malformed JSON', '{"type": "spawn", "root_password": ', 'nip17'],
    ['unknown type', JSON.stringify({ type: 'reboot', workload_id: 'w-000000000000' }), 'nip17'],
    ['content over 64 KiB', JSON.stringify({ type: 'spawn', root_password: PASSWORD, pad: 'x'.repeat(66_000) }), 'nip04'],
    ['wrong field types', JSON.stringify({ type: 'spawn', root_password: PASSWORD, vcpus: 'two' }), 'nip17'],
    ['missing password', JSON.stringify({ type: 'spawn' }), 'nip04'],
  ];

  it.each(cases)('%s gets an invalid_request reply, and nothing is created', async (_name, content, channel) => {
    const c = await client(channel);
    const reply = await c.request(content, { timeoutMs: 30_000 });
    expect(reply).toMatchObject({ type: 'error', code: 'invalid_request' });
    expect(reply.message).not.toContain('x'.repeat(100));
    expect(reply.message).not.toContain(PASSWORD);
    expect(agent.proc.exitCode).toBeNull();
    expect(existsSync(agent.vmRoot) ? readdirSync(agent.vmRoot) : []).toEqual([]);
  });

  it('a minimum isolation the provider does not offer gets isolation_unavailable', async () => {
    const c = await client();
    const r = await c.request({ type: 'spawn', root_password: PASSWORD, isolation: 'attested-research-tier' }, { timeoutMs: 30_000 });
    expect(r).toMatchObject({ type: 'error', code: 'isolation_unavailable' });
  });

  it('plan limits are enforced', async () => {
    const c = await client();
    expect(await c.request({ type: 'spawn', root_password: PASSWORD, plan: 'nope' }, { timeoutMs: 30_000 })).toMatchObject({ code: 'unknown_plan' });
    expect(await c.request({ type: 'spawn', root_password: PASSWORD, memory_mb: 4096 }, { timeoutMs: 30_000 })).toMatchObject({ code: 'exceeds_plan' });
  });

  it('ignores a wrap for another key and a forged wrap, and keeps serving', async () => {
    const c = await client();
    const other = generateSecretKey();
    // 1. A perfectly good wrap, for someone else.
    await publishRaw(giftWrap(generateSecretKey(), getPublicKey(other), rumorFrom(getPublicKey(generateSecretKey()))));
    // 2. A forged wrap for the agent: the seal is signed by one key, the rumor claims another.
    const victim = getPublicKey(generateSecretKey());
    await publishRaw(giftWrap(generateSecretKey(), agent.pubkey, rumorFrom(victim, JSON.stringify({ type: 'status', workload_id: 'w-000000000000' }))));
    await agent.waitForLog(/forged_sender/, 10_000);
    const r = await c.request({ type: 'status', workload_id: 'w-000000000000' }, { timeoutMs: 30_000 });
    expect(r).toMatchObject({ code: 'not_found' });
    expect(agent.proc.exitCode).toBeNull();
  });
});

// --- raw event helpers: the hostile side, built by hand on purpose ---

function rumorFrom(pubkey: string, content = 'hello') {
  const rumor = { kind: 14, pubkey, created_at: Math.floor(Date.now() / 1000), tags: [['p', agent.pubkey]], content, id: '' };
  rumor.id = getEventHash(rumor);
  return rumor;
}

/** Seal `rumor` with `sealer`'s key (whatever the rumor claims) and wrap it for `recipient`. */
function giftWrap(sealer: Uint8Array, recipient: string, rumor: object) {
  const now = Math.floor(Date.now() / 1000);
  const seal = finalizeEvent(
    { kind: 13, created_at: now, tags: [], content: nip44.encrypt(JSON.stringify(rumor), nip44.getConversationKey(sealer, recipient)) },
    sealer,
  );
  const ephemeral = generateSecretKey();
  return finalizeEvent(
    { kind: 1059, created_at: now, tags: [['p', recipient]], content: nip44.encrypt(JSON.stringify(seal), nip44.getConversationKey(ephemeral, recipient)) },
    ephemeral,
  );
}

async function publishRaw(event: object): Promise<void> {
  const c = clients[0]!;
  await c.publishEvent(event as never);
}

describe('phase timings', () => {
  it('logs every spawn phase under the contract bench/phases.ts reads (docs/logs.md)', async () => {
    const c = await client();
    const reply = await c.request({ type: 'spawn', root_password: PASSWORD }, { timeoutMs: 60_000 });
    expect(reply.type).toBe('access_details');
    const phases = spawnPhasesOf(agent.output(), reply.workload_id as string);
    for (const phase of SPAWN_PHASES) expect(phases[phase], phase).toBeTypeOf('number');
    expect(phases.driverTotal).toBeTypeOf('number');
    await c.request({ type: 'stop', workload_id: reply.workload_id }, { timeoutMs: 30_000 });
  });
});
