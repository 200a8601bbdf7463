/**
 * Paid compute end to end, with real parts: the agent CLI as a child process
 * in `paid` mode, a relay on 127.0.0.1, the test mint (a real HTTP server with
 * real Cashu cryptography), consumers' cashu-ts wallets, qemu booting the tiny
 * guest. Ports 47450-47499.
 */
import { createServer, type Server } from 'node:net';
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { execa } from 'execa';
import { nsecEncode } from 'nostr-tools/nip19';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { generateSecretKey, getPublicKey } from 'nostr-tools';
import { getDecodedToken, Wallet } from '@cashu/cashu-ts';
import { ConsumerClient, type ReplyMessage } from '../../src/client/consumer.js';
import { openDm, sealDmRequest } from '../../src/nostr/dm.js';
import { RelayPool } from '../../src/nostr/relays.js';
import type { NostrEvent } from '../../src/nostr/types.js';
import { createPayments } from '../../src/payment/index.js';
import { silentLogger } from '../../src/util/logger.js';
import { consumerToken, DropConnection, TestMint, type MintUnit } from '../support/mint.js';
import { startRelay, type LocalRelay } from '../support/relay.js';
import { ensureTinyGuest } from '../support/tiny-guest.js';
import { startAgentProcess, type AgentProcess, type GuestPaths } from '../support/agent-process.js';
import { qemuPidsMatching, until } from '../support/net.js';

const PASSWORD = 'paid-passw0rd-for-tests';
const CONSUMER_CLI = new URL('../../src/cli/consumer.ts', import.meta.url).pathname;
const RATE = 1000; // msat per second: 1 sat buys 1 s
const MAX_LEASE = 600;

const mint = new TestMint({ port: 47450, units: ['sat', 'msat', 'usd'] });
const foreign = new TestMint({ port: 47451 });
let relay: LocalRelay;
let guest: GuestPaths;
let agent: AgentProcess;
const agents: AgentProcess[] = [];
const clients: ConsumerClient[] = [];
const pools: RelayPool[] = [];

function paidOverrides(): Record<string, unknown> {
  return {
    admission: { mode: 'paid', minimumDurationSeconds: 10, maxLeaseSeconds: MAX_LEASE },
    payment: { whitelistedMints: [mint.url] },
    plans: [
      { id: 'tiny', name: 'Tiny', description: 'paid test plan', vcpus: 1, memoryMb: 256, diskGb: 2, durationSeconds: 3600, rateMsatsPerSec: RATE },
      { id: 'free', name: 'Free', description: 'rate 0', vcpus: 1, memoryMb: 256, diskGb: 2, durationSeconds: 300, rateMsatsPerSec: 0 },
    ],
    leases: { checkIntervalMs: 500, warnBeforeSeconds: 15 },
  };
}

async function start(opts: { ports: { from: number; to: number }; overrides?: Record<string, unknown>; root?: string; sk?: Uint8Array }): Promise<AgentProcess> {
  const a = await startAgentProcess({ relays: [relay.url], guest, portRange: opts.ports, overrides: opts.overrides ?? paidOverrides(), root: opts.root, sk: opts.sk });
  agents.push(a);
  return a;
}

beforeAll(async () => {
  guest = await ensureTinyGuest();
  await mint.start();
  await foreign.start();
  relay = await startRelay({ port: 47452 });
  agent = await start({ ports: { from: 47460, to: 47469 } });
});

afterAll(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await Promise.all(pools.map((p) => p.close()));
  for (const a of agents) {
    if (a.proc.exitCode === null && !a.proc.killed) await a.stop();
    for (const pid of qemuPidsMatching(a.vmRoot)) process.kill(pid, 'SIGKILL');
  }
  await relay?.stop();
  await mint.stop();
  await foreign.stop();
});

async function client(to: AgentProcess = agent, sk = generateSecretKey()): Promise<ConsumerClient> {
  const c = new ConsumerClient({ sk, provider: to.pubkey, relays: [relay.url] });
  await c.start();
  clients.push(c);
  return c;
}


/** Another consumer wallet takes the token: it is real money at the mint. Returns what it received. */
async function redeemElsewhere(token: string): Promise<number> {
  const wallet = new Wallet(mint.url, { unit: 'sat' });
  await wallet.loadMint();
  const proofs = await wallet.receive(token);
  return proofs.reduce((s, p) => s + Number(p.amount.toString()), 0);
}

function states(token: string, at: TestMint = mint): string[] {
  return getDecodedToken(token, at.keysets.map((k) => k.id)).proofs.map((p) => at.stateOf(p.secret));
}

/** The provider's balance at the test mint in sat, read from its wallet files. */
async function providerSats(a: AgentProcess = agent): Promise<number> {
  const wallet = createPayments({ stateDir: a.stateDir, providerSecretKey: a.sk, config: { whitelistedMints: [mint.url] }, logger: silentLogger });
  return (await wallet.balance()).filter((b) => b.unit === 'sat').reduce((s, b) => s + b.amount, 0);
}

function spawnRequest(token?: string, plan = 'tiny'): Record<string, unknown> {
  return { type: 'spawn', root_password: PASSWORD, plan, ...(token ? { cashu_token: token } : {}) };
}

async function stop(c: ConsumerClient, workloadId: unknown): Promise<void> {
  const r = await c.request({ type: 'stop', workload_id: workloadId }, { timeoutMs: 60_000 });
  expect(r.type).toBe('stopped');
}

describe('paid spawn', () => {
  it('swaps the token only after the free checks: the mint shows it spent, the wallet rose, the lease is what it bought', async () => {
    const c = await client();
    const before = await providerSats();
    const token = await consumerToken(mint, 100);
    const r = await c.request(spawnRequest(token), { timeoutMs: 60_000 });
    const answeredAt = Date.now();
    expect(r).toMatchObject({ type: 'access_details', paid_msats: 100_000, refund_msats: 0 });
    expect(r).not.toHaveProperty('refund_token');
    // 100 s from the moment the VM existed, which is before the answer arrived.
    const leaseMs = Date.parse(r.expires_at as string) - answeredAt;
    expect(leaseMs).toBeGreaterThan(60_000);
    expect(leaseMs).toBeLessThanOrEqual(100_000);
    expect(states(token).every((s) => s === 'SPENT')).toBe(true);
    expect(await providerSats()).toBe(before + 100);

    // The same token again: the mint refuses it, nothing is started.
    const vms = readdirSync(agent.vmRoot).length;
    const again = await c.request(spawnRequest(token), { timeoutMs: 60_000 });
    expect(again).toMatchObject({ type: 'error', code: 'token_already_spent', error_type: 'token_already_spent' });
    expect(readdirSync(agent.vmRoot).length).toBe(vms);
    await stop(c, r.workload_id);
    expect(agent.output()).not.toContain(token.slice(0, 40));
  });

  it('refuses too little, a wrong unit, a foreign mint and no token, with the token untouched and no request to the foreign mint', async () => {
    const c = await client();
    const small = await consumerToken(mint, 5);
    expect(await c.request(spawnRequest(small), { timeoutMs: 60_000 })).toMatchObject({ code: 'insufficient_payment' });
    expect(states(small).every((s) => s === 'UNSPENT')).toBe(true);

    const usd = await consumerToken(mint, 500, 'usd');
    expect(await c.request(spawnRequest(usd), { timeoutMs: 60_000 })).toMatchObject({ code: 'unsupported_unit' });
    expect(states(usd).every((s) => s === 'UNSPENT')).toBe(true);

    const alien = await consumerToken(foreign, 500);
    const seenByForeign = foreign.requests.length;
    expect(await c.request(spawnRequest(alien), { timeoutMs: 60_000 })).toMatchObject({ code: 'non_whitelisted_mint' });
    expect(foreign.requests.length).toBe(seenByForeign);
    expect(states(alien, foreign).every((s) => s === 'UNSPENT')).toBe(true);

    expect(await c.request(spawnRequest(), { timeoutMs: 60_000 })).toMatchObject({ code: 'payment_required' });
    // A free check that fails first never looks at the token.
    const fine = await consumerToken(mint, 50);
    expect(await c.request({ ...spawnRequest(fine), plan: 'nope' }, { timeoutMs: 60_000 })).toMatchObject({ code: 'unknown_plan' });
    expect(states(fine).every((s) => s === 'UNSPENT')).toBe(true);
  });

  it('a plan at rate 0 is free: no token needed, none taken', async () => {
    const c = await client();
    const r = await c.request(spawnRequest(undefined, 'free'), { timeoutMs: 60_000 });
    expect(r).toMatchObject({ type: 'access_details' });
    expect(r).not.toHaveProperty('paid_msats');
    await stop(c, r.workload_id);
  });

  it('an overpayment buys the maximum lease and the rest comes back as a token another wallet redeems', async () => {
    const c = await client();
    const before = await providerSats();
    const r = await c.request(spawnRequest(await consumerToken(mint, 1000)), { timeoutMs: 60_000 });
    expect(r).toMatchObject({ type: 'access_details', paid_msats: 1_000_000, refund_msats: 400_000, refund_token: expect.stringMatching(/^cashu[AB]/) });
    expect(Date.parse(r.expires_at as string) - Date.now()).toBeLessThanOrEqual(MAX_LEASE * 1000);
    expect(await redeemElsewhere(r.refund_token as string)).toBe(400);
    expect(await providerSats()).toBe(before + 600);
    await stop(c, r.workload_id);
  });
});

describe('top-up', () => {
  it('extends from the current expiry, and the expiring warning comes again for the new end', async () => {
    const c = await client();
    const notices: ReplyMessage[] = [];
    c.onReply((r) => {
      if (r.type === 'expiring') notices.push(r);
    });
    const spawned = await c.request(spawnRequest(await consumerToken(mint, 20)), { timeoutMs: 60_000 });
    expect(spawned.type).toBe('access_details');
    await until(() => notices.length === 1, 30_000, 'the first expiring notice');

    const token = await consumerToken(mint, 30);
    const r = await c.request({ type: 'topup', workload_id: spawned.workload_id, cashu_token: token }, { timeoutMs: 60_000 });
    expect(r).toMatchObject({ type: 'topped_up', workload_id: spawned.workload_id, extended_seconds: 30, paid_msats: 30_000, refund_msats: 0 });
    expect(Date.parse(r.expires_at as string)).toBe(Date.parse(spawned.expires_at as string) + 30_000);
    const status = await c.request({ type: 'status', workload_id: spawned.workload_id }, { timeoutMs: 30_000 });
    expect(status).toMatchObject({ expires_at: r.expires_at, state: 'running' });

    await until(() => notices.length === 2, 40_000, 'the expiring notice for the new end');
    expect(notices[1]).toMatchObject({ workload_id: spawned.workload_id, expires_at: r.expires_at });

    // Someone else's workload: refused before the swap.
    const stranger = await client();
    const theirs = await consumerToken(mint, 30);
    expect(await stranger.request({ type: 'topup', workload_id: spawned.workload_id, cashu_token: theirs }, { timeoutMs: 30_000 })).toMatchObject({ code: 'not_found' });
    expect(states(theirs).every((s) => s === 'UNSPENT')).toBe(true);
    await stop(c, spawned.workload_id);
  });
});

describe('upstream client', () => {
  it('reads every answer as the upstream CLI does (the first provider DM after its request), paid spawn and top-up included', async () => {
    const sk = generateSecretKey();
    const pubkey = getPublicKey(sk);
    const inbox: Array<{ at: number; body: Record<string, any> }> = [];
    const pool = new RelayPool({ urls: [relay.url], logger: silentLogger });
    pools.push(pool);
    pool.start();
    pool.subscribe([{ kinds: [4, 1059], '#p': [pubkey], since: Math.floor(Date.now() / 1000) - 3 * 24 * 3600 }], (event: NostrEvent) => {
      const opened = openDm(event, sk, pubkey);
      if (opened.ok && opened.dm.sender === agent.pubkey) inbox.push({ at: Date.now(), body: JSON.parse(opened.dm.content) });
    });
    await pool.waitConnected(5_000);
    /** Upstream matches no request id: its answer is simply the first DM from the provider after sending. */
    const ask = async (content: string): Promise<Record<string, any>> => {
      const from = inbox.length;
      const { event } = sealDmRequest({ sk, recipient: agent.pubkey, content, channel: 'nip04' });
      await pool.publish(event);
      await until(() => inbox.length > from, 60_000, 'a DM from the provider');
      return inbox[from]!.body;
    };

    // Paid long enough to outlast a slow boot on a loaded host.
    const spawn = await ask(JSON.stringify({ cashu_token: await consumerToken(mint, 400), pod_spec_id: 'tiny', pod_image: 'x', ssh_username: 'u', ssh_password: PASSWORD }));
    expect(spawn).toMatchObject({ pod_npub: expect.stringMatching(/^container-w-/), node_port: expect.any(Number), paid_msats: 400_000 });
    // The guest becomes ready meanwhile; a v1 client would get `ready`, upstream's must not (it would read it as its next answer).
    await agent.waitForLog(new RegExp(`"workloadId":"${spawn.workload_id}".*workload ready`), 360_000);

    const topup = await ask(JSON.stringify({ pod_npub: spawn.pod_npub, cashu_token: await consumerToken(mint, 50) }));
    expect(topup).toMatchObject({ success: true, pod_npub: spawn.pod_npub, extended_duration_seconds: 50, new_expires_at: expect.any(String), message: expect.any(String) });
    const spent = await consumerToken(mint, 50);
    await redeemElsewhere(spent);
    const refused = await ask(JSON.stringify({ pod_npub: spawn.pod_npub, cashu_token: spent }));
    expect(refused).toMatchObject({ error_type: 'token_already_spent', details: null });
    const garbage = await ask('{not json');
    expect(garbage).toMatchObject({ error_type: 'invalid_request' });

    // Nothing but answers arrived: every DM is access details, a top-up or an error upstream can parse.
    expect(inbox).toHaveLength(4);
    for (const m of inbox) expect(m.body.pod_npub !== undefined || m.body.error_type !== undefined).toBe(true);

    const owner = new ConsumerClient({ sk, provider: agent.pubkey, relays: [relay.url], channel: 'nip04' });
    await owner.start();
    clients.push(owner);
    await stop(owner, spawn.workload_id);
  }, 480_000);
});

describe('consumer CLI', () => {
  it('pays from --token-file and --token-stdin, and prints the refund token on a line of its own', async () => {
    const home = mkdtempSync(join(tmpdir(), 'pga-paycli-'));
    const tokenFile = join(home, 'token.txt');
    writeFileSync(tokenFile, `${await consumerToken(mint, 1000)}\n`, { mode: 0o600 });
    const env = { PAYGRESS_NSEC: nsecEncode(generateSecretKey()), PAYGRESS_ROOT_PASSWORD: PASSWORD, XDG_CONFIG_HOME: home };
    const common = ['--provider', agent.pubkey, '--relay', relay.url];
    const spawned = await execa('node', ['--import', 'tsx', CONSUMER_CLI, 'spawn', ...common, '--token-file', tokenFile], { env, reject: false, stdin: 'ignore', timeout: 90_000 });
    expect(spawned.exitCode).toBe(0);
    const refundLine = spawned.stdout.split('\n').find((l) => l.startsWith('refund token (400 sat): '));
    expect(refundLine).toBeDefined();
    expect(await redeemElsewhere(refundLine!.slice('refund token (400 sat): '.length))).toBe(400);
    const id = /workload (w-[0-9a-f]{12})/.exec(spawned.stdout)?.[1];
    expect(id).toBeDefined();

    const small = await consumerToken(mint, 10);
    const topped = await execa('node', ['--import', 'tsx', CONSUMER_CLI, 'topup', ...common, id!, '--token-stdin', '--json'], {
      env,
      reject: false,
      input: small,
      timeout: 90_000,
    });
    // At the maximum already: refused before the swap, the token untouched.
    expect(topped.exitCode).toBe(2);
    expect(JSON.parse(topped.stdout)).toMatchObject({ type: 'error', code: 'invalid_request' });
    expect(states(small).every((st) => st === 'UNSPENT')).toBe(true);
    const usage = await execa('node', ['--import', 'tsx', CONSUMER_CLI, 'topup', ...common, id!], { env, reject: false, stdin: 'ignore', timeout: 90_000 });
    expect(usage.exitCode).toBe(64);
    const stopped = await execa('node', ['--import', 'tsx', CONSUMER_CLI, 'stop', ...common, id!], { env, reject: false, stdin: 'ignore', timeout: 90_000 });
    expect(stopped.stdout).toContain('stopped');
  });
});

describe('a paid guest that never boots', () => {
  it('is answered boot_failed with everything its lease held refunded', async () => {
    const c = await client();
    const replies: ReplyMessage[] = [];
    const r = await c.request(spawnRequest(await consumerToken(mint, 70)), {
      timeoutMs: 120_000,
      done: (m) => m.type === 'boot_failed' || m.type === 'ready',
      onProgress: (m) => {
        replies.push(m);
        // The guest dies during boot (before the tiny guest's banner could count as ready).
        if (m.type === 'access_details') process.kill(Number(readFileSync(join(agent.vmRoot, m.workload_id as string, 'qemu.pid'), 'utf8').trim()), 'SIGKILL');
      },
    });
    expect(replies[0]).toMatchObject({ type: 'access_details', paid_msats: 70_000 });
    expect(r).toMatchObject({ type: 'boot_failed', reason: 'died', paid_msats: 70_000, refund_msats: 70_000, refund_token: expect.stringMatching(/^cashu[AB]/) });
    expect(await redeemElsewhere(r.refund_token as string)).toBe(70);
    expect(readdirSync(join(agent.stateDir, 'payments'))).toEqual([]);
  });
});

describe('failures after the swap', () => {
  let blocker: Server;
  let second: AgentProcess;

  it('a spawn that fails after payment answers with a refund of everything, which another wallet redeems', async () => {
    // The agent's only port is taken once it runs: the driver fails after the payment went through.
    second = await start({ ports: { from: 47470, to: 47470 } });
    blocker = createServer();
    await new Promise<void>((resolve) => blocker.listen(47470, '127.0.0.1', resolve));
    const c = await client(second);
    const r = await c.request(spawnRequest(await consumerToken(mint, 80)), { timeoutMs: 60_000 });
    expect(r).toMatchObject({ type: 'error', paid_msats: 80_000, refund_msats: 80_000, refund_token: expect.stringMatching(/^cashu[AB]/) });
    expect(['capacity_exhausted', 'spawn_failed']).toContain(r.code);
    expect(await redeemElsewhere(r.refund_token as string)).toBe(80);
    expect(await providerSats(second)).toBe(0);
    await new Promise<void>((resolve) => blocker.close(() => resolve()));
  });

  it('SIGKILL after the swap and before the lease: the next start refunds it all and answers the consumer', async () => {
    const c = await client(second);
    const token = await consumerToken(mint, 90);
    let killed = false;
    mint.afterSwap = () => {
      if (killed) return;
      killed = true;
      second.proc.kill('SIGKILL');
      throw new DropConnection();
    };
    try {
      const answer = c.request(spawnRequest(token), { timeoutMs: 120_000 });
      await second.proc;
      expect(killed).toBe(true);
      expect(states(token).every((s) => s === 'SPENT')).toBe(true);
      mint.afterSwap = undefined;
      const restarted = await start({ ports: { from: 47471, to: 47474 }, root: second.root, sk: second.sk });
      second = restarted;
      const r = await answer;
      expect(r).toMatchObject({ type: 'error', paid_msats: 90_000, refund_msats: 90_000, refund_token: expect.stringMatching(/^cashu[AB]/) });
      expect(await redeemElsewhere(r.refund_token as string)).toBe(90);
      expect(await providerSats(restarted)).toBe(0);
      expect(readdirSync(join(restarted.stateDir, 'payments'))).toEqual([]);
    } finally {
      mint.afterSwap = undefined;
    }
  });

  it('SIGKILL while the VM is being made after the swap: the next start answers, the money kept for a lease or refunded in full', async () => {
    const c = await client(second);
    const answer = c.request(spawnRequest(await consumerToken(mint, 95)), { timeoutMs: 120_000 });
    await second.waitForLog(/payment received/, 60_000);
    await second.kill();
    const restarted = await start({ ports: { from: 47471, to: 47474 }, root: second.root, sk: second.sk });
    const r = await answer;
    if (r.type === 'access_details') {
      // The lease was written before the kill: the payment stays with it.
      expect(r).toMatchObject({ paid_msats: 95_000, refund_msats: 0 });
      await stop(c, r.workload_id);
    } else {
      expect(r).toMatchObject({ type: 'error', paid_msats: 95_000, refund_msats: 95_000, refund_token: expect.stringMatching(/^cashu[AB]/) });
      expect(await redeemElsewhere(r.refund_token as string)).toBe(95);
      // Whatever the killed spawn had made of the VM is gone.
      expect(qemuPidsMatching(restarted.vmRoot)).toEqual([]);
    }
    expect(readdirSync(join(restarted.stateDir, 'payments'))).toEqual([]);
    expect(readdirSync(join(restarted.stateDir, 'inflight'))).toEqual([]);
  });
});

describe('allowlist', () => {
  it('spawns for listed keys only; others get not_allowed', async () => {
    const listed = generateSecretKey();
    const a = await start({
      ports: { from: 47480, to: 47484 },
      overrides: { admission: { mode: 'allowlist', allowlist: [getPublicKey(listed)] } },
    });
    const stranger = await client(a);
    expect(await stranger.request(spawnRequest(), { timeoutMs: 60_000 })).toMatchObject({ code: 'not_allowed', error_type: 'not_allowed' });
    const friend = await client(a, listed);
    const r = await friend.request(spawnRequest(), { timeoutMs: 60_000 });
    expect(r.type).toBe('access_details');
    await stop(friend, r.workload_id);
  });
});
