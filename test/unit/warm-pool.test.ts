/**
 * The warm pool in-process: its pure decisions, and the agent with a pool
 * on the fake driver (whose warm side can boot slowly, die, refuse or hang
 * a hand-off): spawns served from the pool, take-once, counting against the
 * host's limits, refill with backoff, fallbacks, reload and restarts.
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { PaymentFlow } from '../../src/agent/payment-flow.js';
import { PaymentJournal } from '../../src/agent/payment-journal.js';
import { silentLogger } from '../../src/util/logger.js';
import { Gate } from '../support/gate.js';
import { backoffMs, poolStep, type PoolVm } from '../../src/agent/pool-plan.js';
import type { Plan } from '../../src/agent/plans.js';
import { BIG_PLAN, closeHarnesses, Harness, hex32, POOLED_PLAN, SMALL_PLAN, SPAWN, WAIT } from '../support/agent-harness.js';
import { FakePayments, fakeToken } from '../support/fake-payments.js';
import type { BootMode } from '../support/fake-driver.js';

afterEach(async () => {
  await closeHarnesses();
});

const KEY = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB3Zk6Ue1hXv5vJXxvO4O0L0x0E0bq5D3dQn3yV6m6m1 tenant@test';
const POOLED_SPAWN = { ...SPAWN, plan: 'pooled', ssh_keys: [KEY] };

function vm(id: string, planId: string, state: PoolVm['state'], size: Pick<Plan, 'vcpus' | 'memoryMb' | 'diskGb'> = POOLED_PLAN): PoolVm {
  return { id, planId, state, vcpus: size.vcpus, memoryMb: size.memoryMb, diskGb: size.diskGb };
}

/** An agent with a pool; `idleBoot`: how its pool VMs boot, set before the pool starts. */
async function pooled(opts: ConstructorParameters<typeof Harness>[0] = {}, idleBoot: BootMode = 'ready'): Promise<Harness> {
  const h = new Harness({ plans: [POOLED_PLAN, SMALL_PLAN], warmPool: {}, ...opts });
  h.driver.idleBoot = idleBoot;
  return h.start();
}

async function poolReady(h: Harness, ready: number): Promise<void> {
  await vi.waitFor(() => expect(h.pool!.stats()).toMatchObject({ ready, booting: 0 }), WAIT);
}

describe('poolStep (pure)', () => {
  const now = 1_000_000;
  it('boots for the first plan short of its count, only when nothing is booting and its backoff is over', () => {
    expect(poolStep([POOLED_PLAN], [], new Map(), now).boot?.id).toBe('pooled');
    expect(poolStep([POOLED_PLAN], [vm('a', 'pooled', 'idle')], new Map(), now).boot?.id).toBe('pooled');
    expect(poolStep([POOLED_PLAN], [vm('a', 'pooled', 'idle'), vm('b', 'pooled', 'claimed')], new Map(), now).boot).toBeUndefined();
    expect(poolStep([POOLED_PLAN], [vm('a', 'pooled', 'booting')], new Map(), now).boot).toBeUndefined();
    expect(poolStep([POOLED_PLAN], [], new Map([['pooled', now + 1]]), now).boot).toBeUndefined();
    expect(poolStep([SMALL_PLAN], [], new Map(), now).boot).toBeUndefined();
  });

  it('calls idle VMs surplus when their plan is gone, resized or over its count; booting and claimed ones are left alone', () => {
    const vms = [vm('a', 'pooled', 'idle'), vm('b', 'pooled', 'claimed'), vm('c', 'pooled', 'idle'), vm('d', 'gone', 'idle'), vm('e', 'gone', 'booting')];
    // Claimed ones count: three of a plan that wants two leave one idle one over.
    expect(poolStep([POOLED_PLAN], vms, new Map(), now).surplus.sort()).toEqual(['c', 'd']);
    expect(poolStep([{ ...POOLED_PLAN, memoryMb: 1024 }], vms, new Map(), now).surplus.sort()).toEqual(['a', 'c', 'd']);
    // Resized: the old VMs do not count, so the plan is topped up as soon as nothing boots.
    expect(poolStep([{ ...POOLED_PLAN, memoryMb: 1024 }], [vm('a', 'pooled', 'idle')], new Map(), now).boot?.id).toBe('pooled');
  });

  it('backs off exponentially up to a cap', () => {
    expect([0, 1, 2, 3, 10, 100].map((n) => backoffMs(n, 5, 100))).toEqual([0, 5, 10, 20, 100, 100]);
  });
});

describe('the pool', () => {
  it('fills to its count one VM at a time', async () => {
    const h = await pooled({}, 'manual');
    await vi.waitFor(() => expect(h.driver.createIdleCalls).toHaveLength(1), WAIT);
    await new Promise((r) => setTimeout(r, 100));
    expect(h.pool!.stats()).toMatchObject({ booting: 1, ready: 0 });
    expect(h.driver.createIdleCalls).toHaveLength(1);
    h.driver.markReady(h.driver.createIdleCalls[0]!.id);
    await vi.waitFor(() => expect(h.driver.createIdleCalls).toHaveLength(2), WAIT);
    h.driver.markReady(h.driver.createIdleCalls[1]!.id);
    await poolReady(h, 2);
    await new Promise((r) => setTimeout(r, 100));
    expect(h.driver.createIdleCalls).toHaveLength(2);
    expect(h.driver.createIdleCalls[0]).toMatchObject({ vcpus: 1, memoryMb: 512, diskGb: 2 });
  });

  it('serves a full-size spawn of its plan: handed off with the tenant\'s password, keys and hostname, access details then ready at once', async () => {
    const h = await pooled();
    await poolReady(h, 2);
    const poolIds = h.pool!.ids();
    const reply = await h.spawn(hex32(), POOLED_SPAWN);
    expect(poolIds).toContain(reply.workload_id);
    expect(h.driver.createCalls).toEqual([]);
    expect(h.driver.handOffCalls).toEqual([{ id: reply.workload_id, tenant: { hostname: reply.workload_id, rootPassword: SPAWN.root_password, sshKeys: [KEY] } }]);
    const ready = await h.outbox.next((s) => s.message.type === 'ready', 'ready');
    expect(ready.message).toMatchObject({ workload_id: reply.workload_id, request_id: reply.request_id });
    expect(h.leases.get(reply.workload_id)?.readyAt).toBeDefined();
    expect(h.workloads.phase(reply.workload_id)).toBe('ready');
    // Refilled to two idle VMs beside the tenant's.
    await poolReady(h, 2);
    expect(h.pool!.ids()).not.toContain(reply.workload_id);
    expect(h.pool!.stats().handedOff).toBe(1);
  });

  it('boots cold for a request smaller than its plan, and for a plan without a pool', async () => {
    const h = await pooled();
    await poolReady(h, 2);
    await h.spawn(hex32(), { ...POOLED_SPAWN, memory_mb: 256 });
    await h.spawn(hex32(), { ...SPAWN, plan: 'small' });
    expect(h.driver.createCalls).toHaveLength(2);
    expect(h.driver.handOffCalls).toEqual([]);
    expect(h.pool!.stats().ready).toBe(2);
  });

  it('a boot whose readiness wait throws is destroyed and replaced, and the agent keeps running', async () => {
    const h = await pooled({ plans: [{ ...POOLED_PLAN, warmPool: 1 }] });
    await poolReady(h, 1);
    h.driver.waitIdleErrors.push(new Error('vm.json unreadable'));
    await h.spawn(hex32(), POOLED_SPAWN);
    await vi.waitFor(() => expect(h.pool!.stats()).toMatchObject({ bootFailed: 1 }), WAIT);
    const broken = h.driver.createIdleCalls[1]!.id;
    await vi.waitFor(() => expect(h.driver.destroyCalls).toContain(broken), WAIT);
    await poolReady(h, 1);
    expect(h.driver.createIdleCalls).toHaveLength(3);
  });

  it('gives each VM to one spawn only, also when spawns arrive together', async () => {
    const h = await pooled({ plans: [{ ...POOLED_PLAN, warmPool: 1 }] });
    await poolReady(h, 1);
    h.driver.idleBoot = 'never';
    const replies = await Promise.all([h.spawn(hex32(), POOLED_SPAWN), h.spawn(hex32(), POOLED_SPAWN), h.spawn(hex32(), POOLED_SPAWN)]);
    const ids = replies.map((r) => r.workload_id);
    expect(new Set(ids).size).toBe(3);
    expect(h.driver.handOffCalls).toHaveLength(1);
    expect(h.driver.createCalls).toHaveLength(2);
    expect(h.driver.secondHandOffs).toBe(0);
  });

  it('counts against maxVms: a pooled spawn is not counted twice, and the pool never refills past the limit', async () => {
    const h = await pooled({ limits: { maxVms: 2 } });
    await poolReady(h, 2);
    const first = await h.spawn(hex32(), POOLED_SPAWN);
    expect(h.driver.handOffCalls.map((c) => c.id)).toEqual([first.workload_id]);
    await new Promise((r) => setTimeout(r, 200));
    expect(h.pool!.stats()).toMatchObject({ ready: 1, booting: 0 });
    expect(h.driver.createIdleCalls).toHaveLength(2);
    await h.spawn(hex32(), POOLED_SPAWN);
    expect(await h.request(hex32(), POOLED_SPAWN)).toMatchObject({ type: 'error', code: 'capacity_exhausted' });
    expect(h.driver.workloads.size).toBe(2);
    expect(h.driver.createIdleCalls).toHaveLength(2);
  });

  it('gives up idle VMs for a tenant who finds no room, and only when that makes room', async () => {
    const h = await pooled({ limits: { maxVms: 2, hostCapacity: { vcpus: 100, memoryMb: 2048 } }, plans: [POOLED_PLAN, SMALL_PLAN, BIG_PLAN] });
    await poolReady(h, 2);
    // 4096 MB do not fit even without the pool: nothing is given up.
    expect(await h.request(hex32(), { ...SPAWN, plan: 'big' })).toMatchObject({ type: 'error', code: 'capacity_exhausted' });
    expect(h.pool!.stats()).toMatchObject({ ready: 2, evicted: 0 });
    // A small VM fits once one pool VM is gone.
    const [, newest] = h.pool!.ids();
    const small = await h.spawn(hex32(), { ...SPAWN, plan: 'small' });
    expect(h.driver.createCalls.map((c) => c.id)).toEqual([small.workload_id]);
    expect(h.pool!.stats()).toMatchObject({ ready: 1, evicted: 1 });
    expect(h.driver.destroyCalls).toEqual([newest]);
    // The pool keeps the one left and boots none into the tenant's room.
    await new Promise((r) => setTimeout(r, 200));
    expect(h.driver.createIdleCalls).toHaveLength(2);
    expect(h.driver.workloads.size).toBe(2);
  });

  it('gives idle VMs up only once the spawn is paid, and an eviction is no failure: the pool refills without backing off', async () => {
    const payments = new FakePayments();
    const small: Plan = { ...SMALL_PLAN, rateMsatsPerSec: 1000 };
    const h = await pooled({ limits: { maxVms: 2 }, plans: [POOLED_PLAN, small], payments, warmPool: { backoff: { baseMs: 600_000, maxMs: 600_000 } } });
    await poolReady(h, 2);
    // A worthless token: refused for its payment, and the pool keeps both VMs.
    expect(await h.request(hex32(), { ...SPAWN, plan: 'small', cashu_token: 'cashuAnot-a-token' })).toMatchObject({ type: 'error' });
    expect(h.pool!.stats()).toMatchObject({ ready: 2, evicted: 0 });
    expect(h.driver.destroyCalls).toEqual([]);
    // A paid one gets the room of one pool VM.
    const owner = hex32();
    const reply = await h.request(owner, { ...SPAWN, plan: 'small', cashu_token: fakeToken(600_000) });
    expect(reply).toMatchObject({ type: 'access_details' });
    expect(h.pool!.stats()).toMatchObject({ ready: 1, evicted: 1 });
    // Its room back, the pool boots again at once: no backoff for an eviction.
    await h.request(owner, { type: 'stop', workload_id: (reply as { workload_id: string }).workload_id });
    await poolReady(h, 2);
  });

  it('a paid spawn whose pool room was taken while it paid is refused and refunded', async () => {
    const payments = new FakePayments();
    const small: Plan = { ...SMALL_PLAN, rateMsatsPerSec: 1000 };
    const h = await pooled({ limits: { maxVms: 2 }, plans: [{ ...POOLED_PLAN, warmPool: 1 }, small], payments });
    await poolReady(h, 1);
    await h.spawn(hex32(), { ...SPAWN, plan: 'small', cashu_token: fakeToken(600_000) });
    // The host is full: one tenant, one pool VM. Two paid spawns each need the pool VM's room.
    payments.redeemGate = new Gate();
    const a = h.deliver(hex32(), { ...SPAWN, plan: 'small', cashu_token: fakeToken(600_000) });
    const b = h.deliver(hex32(), { ...SPAWN, plan: 'small', cashu_token: fakeToken(600_000) });
    await new Promise((r) => setTimeout(r, 100));
    expect(h.pool!.stats()).toMatchObject({ ready: 1, evicted: 0 });
    payments.redeemGate.release();
    const answers = await Promise.all([a, b].map(({ requestId }) => h.outbox.next((s) => s.route.replyTo === requestId, 'answer')));
    const types = answers.map((x) => x.message.type).sort();
    expect(types).toEqual(['access_details', 'error']);
    const refused = answers.find((x) => x.message.type === 'error')!;
    expect(refused.message).toMatchObject({ code: 'capacity_exhausted', paid_msats: 600_000, refund_msats: 600_000 });
    expect(h.pool!.stats()).toMatchObject({ evicted: 1 });
  });

  it('gives up a booting VM too for a tenant who finds no room: its boot is cut short and the VM destroyed', async () => {
    const h = await pooled({ limits: { maxVms: 1 }, plans: [{ ...POOLED_PLAN, warmPool: 1 }, SMALL_PLAN] }, 'manual');
    await vi.waitFor(() => expect(h.pool!.stats().booting).toBe(1), WAIT);
    const [booting] = h.pool!.ids();
    const small = await h.spawn(hex32(), { ...SPAWN, plan: 'small' });
    expect(h.driver.createCalls.map((c) => c.id)).toEqual([small.workload_id]);
    expect(h.pool!.stats()).toMatchObject({ evicted: 1, bootFailed: 0 });
    await vi.waitFor(() => expect(h.driver.destroyCalls).toContain(booting), WAIT);
    expect([...h.driver.workloads.keys()]).toEqual([small.workload_id]);
  });

  it('counts against committed memory: tenants first, the pool takes only what is left', async () => {
    const h = new Harness({ plans: [POOLED_PLAN, SMALL_PLAN], warmPool: {}, limits: { hostCapacity: { vcpus: 100, memoryMb: 1024 } } });
    h.driver.idleBoot = 'manual';
    // A tenant holds 256 MB before the pool starts: room for one 512 MB pool VM, not two.
    await h.spawn(hex32(), { ...SPAWN, plan: 'small' });
    await h.start();
    await vi.waitFor(() => expect(h.driver.createIdleCalls).toHaveLength(1), WAIT);
    h.driver.markReady(h.driver.createIdleCalls[0]!.id);
    await poolReady(h, 1);
    await new Promise((r) => setTimeout(r, 200));
    expect(h.driver.createIdleCalls).toHaveLength(1);
    expect(h.admission.usage(hex32()).memoryMb).toBe(768);
  });

  it('replaces a VM that does not become ready, and one that dies while idle, backing off after failures', async () => {
    const h = await pooled({ plans: [{ ...POOLED_PLAN, warmPool: 1 }], warmPool: { idleTimeoutMs: 30 } }, 'never');
    await vi.waitFor(() => expect(h.pool!.stats().bootFailed).toBeGreaterThanOrEqual(3), WAIT);
    const tried = h.driver.createIdleCalls.map((c) => c.id);
    expect(h.driver.destroyCalls).toEqual(expect.arrayContaining(tried.slice(0, 3)));
    h.driver.idleBoot = 'ready';
    await poolReady(h, 1);
    const [idle] = h.pool!.ids();
    h.driver.kill(idle!);
    await vi.waitFor(() => expect(h.driver.destroyCalls).toContain(idle), WAIT);
    await vi.waitFor(() => expect(h.pool!.ids()).toEqual([expect.not.stringMatching(idle!)]), WAIT);
    await poolReady(h, 1);
    expect(h.driver.workloads.has(idle!)).toBe(false);
  });

  it('retries after a create that fails', async () => {
    const h = new Harness({ plans: [{ ...POOLED_PLAN, warmPool: 1 }], warmPool: {} });
    h.driver.failNextCreate = new (await import('../../src/drivers/types.js')).DriverError('launch_failed', 'qemu exited');
    await h.start();
    await poolReady(h, 1);
    expect(h.driver.createIdleCalls).toHaveLength(2);
    expect(h.pool!.stats().bootFailed).toBe(1);
  });
});

describe('a hand-off that fails', () => {
  it('refused by the guest: that VM is destroyed and the next one handed off', async () => {
    const h = await pooled();
    await poolReady(h, 2);
    const [first, second] = h.pool!.ids();
    h.driver.handOffOutcomes = ['fail'];
    const reply = await h.spawn(hex32(), POOLED_SPAWN);
    expect(h.driver.handOffCalls.map((c) => c.id)).toEqual([first, second]);
    expect(reply.workload_id).toBe(second);
    expect(h.driver.destroyCalls).toContain(first);
    expect(h.leases.all().map((l) => l.workloadId)).toEqual([second]);
    await h.outbox.next((s) => s.message.type === 'ready', 'ready');
  });

  it('hanging: given up at the deadline, destroyed, and the next one used', async () => {
    const h = await pooled();
    await poolReady(h, 2);
    const [first, second] = h.pool!.ids();
    h.driver.handOffOutcomes = ['hang'];
    const reply = await h.spawn(hex32(), POOLED_SPAWN);
    expect(reply.workload_id).toBe(second);
    expect(h.driver.destroyCalls).toContain(first);
    expect(h.driver.workloads.has(first!)).toBe(false);
  });

  it('on every pool VM: the spawn boots cold and is answered as usual', async () => {
    const h = await pooled();
    await poolReady(h, 2);
    h.driver.idleBoot = 'never';
    h.driver.handOffOutcomes = ['fail', 'hang'];
    const reply = await h.spawn(hex32(), POOLED_SPAWN);
    expect(h.driver.handOffCalls).toHaveLength(2);
    expect(h.driver.createCalls.map((c) => c.id)).toEqual([reply.workload_id]);
    expect(h.driver.createCalls[0]).toMatchObject({ rootPassword: SPAWN.root_password, sshKeys: [KEY], memoryMb: 512 });
    await h.outbox.next((s) => s.message.type === 'ready', 'ready');
    expect(h.driver.workloads.size).toBe(1 + h.pool!.ids().length);
  });

  it('on two pool VMs: the spawn boots cold, the others stay in the pool', async () => {
    const h = await pooled({ plans: [{ ...POOLED_PLAN, warmPool: 3 }] });
    await poolReady(h, 3);
    h.driver.idleBoot = 'never';
    h.driver.handOffOutcomes = ['fail', 'fail'];
    const reply = await h.spawn(hex32(), POOLED_SPAWN);
    expect(h.driver.handOffCalls).toHaveLength(2);
    expect(h.driver.createCalls.map((c) => c.id)).toEqual([reply.workload_id]);
    expect(h.pool!.stats().ready).toBe(1);
  });

  it('on every pool VM of a plan that says busy: answered busy, and a paid spawn gets its money back', async () => {
    const payments = new FakePayments();
    const plan: Plan = { ...POOLED_PLAN, rateMsatsPerSec: 1000, whenPoolEmpty: 'busy' };
    const h = await pooled({ plans: [plan], payments });
    await poolReady(h, 2);
    h.driver.idleBoot = 'never';
    h.driver.handOffOutcomes = ['fail', 'fail'];
    const reply = await h.request(hex32(), { ...POOLED_SPAWN, cashu_token: fakeToken(600_000) });
    expect(reply).toMatchObject({ type: 'error', code: 'busy', paid_msats: 600_000, refund_msats: 600_000, refund_token: expect.any(String) });
    expect(h.driver.createCalls).toEqual([]);
    expect(h.leases.all()).toEqual([]);
  });
});

/** A payment flow whose settlement of a spawn waits at a gate (the agent killed between lease and settlement). */
class HeldFinishFlow extends PaymentFlow {
  finishGate: Gate | undefined;
  override async finish(...args: Parameters<PaymentFlow['finish']>): ReturnType<PaymentFlow['finish']> {
    if (this.finishGate) await this.finishGate.passed;
    return super.finish(...args);
  }
}

describe('a paid spawn served by the second pool VM', () => {
  it('cut short by a restart after its lease: answered with its access details and paid, not refunded', async () => {
    const payments = new FakePayments();
    const stateDir = mkdtempSync(join(tmpdir(), 'paygress-unit-'));
    const policy = { minimumSeconds: 60, maxLeaseSeconds: 86_400 };
    const flow = new HeldFinishFlow({ payments, journal: new PaymentJournal(stateDir), policy, logger: silentLogger });
    const plan: Plan = { ...POOLED_PLAN, rateMsatsPerSec: 1000 };
    const h = await pooled({ stateDir, plans: [plan], payments, paymentFlow: flow });
    await poolReady(h, 2);
    const [first, second] = h.pool!.ids();
    h.driver.handOffOutcomes = ['fail'];
    flow.finishGate = new Gate();
    const { requestId } = h.deliver(hex32(), { ...POOLED_SPAWN, cashu_token: fakeToken(600_000) });
    // The payment names the first VM; the lease is the second's.
    await vi.waitFor(() => expect(h.leases.get(second!)?.requestId).toBe(requestId), WAIT);
    expect(h.driver.destroyCalls).toContain(first);

    const after = await h.restart({ paymentFlow: undefined }).start();
    const answer = await after.outbox.next((s) => s.route.replyTo === requestId, 'the answer after restart');
    expect(answer.message).toMatchObject({ type: 'access_details', workload_id: second, paid_msats: 600_000, refund_msats: 0 });
    expect(payments.refunded(requestId)).toBe(0);
    expect(after.leases.get(second!)).toBeDefined();
  });
});

describe('a claim taken for a retry', () => {
  it('goes back to the pool when the spawn journal cannot be written for it', async () => {
    const h = await pooled();
    await poolReady(h, 2);
    h.driver.handOffOutcomes = ['fail'];
    const resources = { plan: POOLED_PLAN, vcpus: POOLED_PLAN.vcpus, memoryMb: POOLED_PLAN.memoryMb, diskGb: POOLED_PLAN.diskGb };
    const claim = h.pool!.take(h.driver.kind, resources);
    let writes = 0;
    const journal = async (): Promise<void> => {
      if (++writes > 1) throw new Error('disk full');
    };
    const spec = { id: 'w-cold', hostname: 'w-cold', vcpus: 1, memoryMb: 512, diskGb: 2, rootPassword: SPAWN.root_password, sshKeys: [KEY] };
    await expect(h.pool!.acquire(claim, h.driver, spec, resources, journal, silentLogger)).rejects.toThrow('disk full');
    expect(h.pool!.stats()).toMatchObject({ claimed: 0 });
    await poolReady(h, 2);
  });
});

describe('an empty pool', () => {
  it('boots cold by default', async () => {
    const h = await pooled({}, 'never');
    const reply = await h.spawn(hex32(), POOLED_SPAWN);
    expect(h.driver.createCalls.map((c) => c.id)).toEqual([reply.workload_id]);
  });

  it('answers busy when the plan says so, before any payment is taken', async () => {
    const payments = new FakePayments();
    const h = await pooled({ plans: [{ ...POOLED_PLAN, rateMsatsPerSec: 1000, whenPoolEmpty: 'busy' }], payments }, 'never');
    const reply = await h.request(hex32(), { ...POOLED_SPAWN, cashu_token: fakeToken(600_000) });
    expect(reply).toMatchObject({ type: 'error', code: 'busy' });
    expect(reply).not.toHaveProperty('paid_msats');
    expect(payments.received.size).toBe(0);
    expect(h.driver.createCalls).toEqual([]);
  });
});

describe('a pooled workload', () => {
  it('is stopped like any other, and its status read like any other', async () => {
    const h = await pooled();
    await poolReady(h, 2);
    const owner = hex32();
    const { workload_id } = await h.spawn(owner, POOLED_SPAWN);
    expect(await h.request(owner, { type: 'status', workload_id })).toMatchObject({ type: 'status', state: 'running' });
    expect(await h.request(owner, { type: 'stop', workload_id })).toMatchObject({ type: 'stopped', workload_id });
    expect(h.driver.workloads.has(workload_id)).toBe(false);
    expect(h.leases.get(workload_id)).toBeUndefined();
  });
});

describe('reload', () => {
  it('shrinks, grows and rebuilds the pool to the new plans', async () => {
    const h = await pooled();
    await poolReady(h, 2);
    const before = h.pool!.ids();
    h.pool!.setPlans([{ ...POOLED_PLAN, warmPool: 1 }, SMALL_PLAN]);
    await vi.waitFor(() => expect(h.pool!.ids()).toHaveLength(1), WAIT);
    expect(h.driver.destroyCalls).toHaveLength(1);
    h.pool!.setPlans([{ ...POOLED_PLAN, warmPool: 3 }, SMALL_PLAN]);
    await poolReady(h, 3);
    const resized = { ...POOLED_PLAN, warmPool: 1, memoryMb: 1024 };
    h.pool!.setPlans([resized]);
    h.agent.updatePolicy({ plans: [resized], defaultPlan: 'pooled', maxContentBytes: 65536, maxConcurrentRequests: 8, maxQueuedRequests: 64 });
    await vi.waitFor(() => expect(h.pool!.stats()).toMatchObject({ ready: 1, booting: 0 }), WAIT);
    await vi.waitFor(() => expect([...h.driver.workloads.values()].map((w) => w.memoryMb)).toEqual([1024]), WAIT);
    expect(before.some((id) => h.driver.workloads.has(id))).toBe(false);
    const reply = await h.spawn(hex32(), POOLED_SPAWN);
    expect(h.driver.handOffCalls.map((c) => c.id)).toEqual([reply.workload_id]);
  });
});

describe('restart', () => {
  it('leaves no pool VM of the previous run and fills the pool again', async () => {
    const h = await pooled();
    await poolReady(h, 2);
    const tenant = await h.spawn(hex32(), POOLED_SPAWN);
    await poolReady(h, 2);
    const old = h.pool!.ids();
    const after = await h.restart().start();
    await poolReady(after, 2);
    expect(old.some((id) => after.driver.workloads.has(id))).toBe(false);
    expect([...after.driver.workloads.keys()].sort()).toEqual([tenant.workload_id, ...after.pool!.ids()].sort());
    expect(after.leases.get(tenant.workload_id)).toBeDefined();
  });

  it('mid-hand-off: the VM is destroyed, never handed to anyone again, and its spawn answered', async () => {
    const h = await pooled({ warmPool: { handOffTimeoutMs: 60_000 } });
    await poolReady(h, 2);
    h.driver.handOffOutcomes = ['hang'];
    const { requestId } = h.deliver(hex32(), POOLED_SPAWN);
    await vi.waitFor(() => expect(h.driver.handOffCalls).toHaveLength(1), WAIT);
    const handing = h.driver.handOffCalls[0]!.id;
    const after = await h.restart().start();
    const answer = await after.outbox.next((s) => s.route.replyTo === requestId, 'the answer after restart');
    expect(answer.message).toMatchObject({ type: 'error', code: 'spawn_failed' });
    expect(after.driver.workloads.has(handing)).toBe(false);
    await poolReady(after, 2);
    await after.spawn(hex32(), POOLED_SPAWN);
    await after.spawn(hex32(), POOLED_SPAWN);
    expect(after.driver.handOffCalls.filter((c) => c.id === handing)).toHaveLength(1);
    expect(after.driver.secondHandOffs).toBe(0);
  });

  it('a clean shutdown destroys the idle VMs and keeps the tenants\'', async () => {
    const h = await pooled();
    await poolReady(h, 2);
    const tenant = await h.spawn(hex32(), POOLED_SPAWN);
    await poolReady(h, 2);
    await h.stop();
    expect([...h.driver.workloads.keys()]).toEqual([tenant.workload_id]);
  });
});
