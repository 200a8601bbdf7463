/**
 * The money paths of the agent, in-process: a fake wallet (the test decides
 * when a swap completes and how it fails) behind the real payment flow and
 * journal, a fake driver, a memory outbox. What each test checks is where
 * the consumer's money ends up, and what the consumer was told about it.
 */
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { PaymentError } from '../../src/payment/types.js';
import { secondsLeft } from '../../src/agent/leases.js';
import { PaymentFlow } from '../../src/agent/payment-flow.js';
import { PaymentJournal } from '../../src/agent/payment-journal.js';
import { silentLogger } from '../../src/util/logger.js';
import { closeHarnesses, Harness, hex32, SPAWN, WAIT } from '../support/agent-harness.js';
import { Gate } from '../support/gate.js';
import { FakePayments, fakeToken } from '../support/fake-payments.js';

afterEach(async () => {
  await closeHarnesses();
});

/** A paid spawn's body: 600 s of the 1000 msat/s plan. */
const PAID_SPAWN = { ...SPAWN, plan: 'paid', cashu_token: fakeToken(600_000) };

function paymentRecord(h: Harness, ref: string): { phase: string } | undefined {
  const file = join(h.stateDir, 'payments', `${ref}.json`);
  return existsSync(file) ? (JSON.parse(readFileSync(file, 'utf8')) as { phase: string }) : undefined;
}

describe('a swap that fails', () => {
  it('after the mint took the token (a local write failed): the record stays for the next start, which refunds it all; nobody is told nothing was kept', async () => {
    const payments = new FakePayments();
    const h = await new Harness({ payments }).start();
    payments.failNextRedeem = { error: Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' }), afterSwap: true };
    const { requestId, done } = h.deliver(hex32(), PAID_SPAWN);
    await done;
    const reply = h.outbox.about(requestId)[0]!.message;
    expect(reply.type).toBe('error');
    expect(String(reply.message)).not.toMatch(/nothing was kept|not taken|still yours/);
    expect(paymentRecord(h, requestId)?.phase).toBe('quoted');

    const after = await h.restart().start();
    const refund = await after.outbox.next((s) => s.route.replyTo === requestId && s.message.type === 'error', 'the refund after restart');
    expect(refund.message).toMatchObject({ paid_msats: 600_000, refund_msats: 600_000, refund_token: expect.any(String) });
    expect(payments.refunded(requestId)).toBe(600_000);
    expect(paymentRecord(after, requestId)).toBeUndefined();
  });

  it('that the wallet knows never reached the mint: the record goes at once, the token is the consumer\'s and is never swapped later', async () => {
    const payments = new FakePayments();
    const h = await new Harness({ payments }).start();
    payments.failNextRedeem = { error: new PaymentError('mint_network_error', 'the mint could not be reached', true), afterSwap: false };
    const { requestId, done } = h.deliver(hex32(), PAID_SPAWN);
    await done;
    expect(h.outbox.about(requestId)[0]!.message).toMatchObject({ type: 'error', code: 'mint_network_error' });
    expect(paymentRecord(h, requestId)).toBeUndefined();

    await h.restart().start();
    expect(payments.received.has(requestId)).toBe(false);
  });
});

describe('top-ups', () => {
  it('two at once for one workload: both extensions and payments stay in the lease, the maximum holds, and readiness is not lost', async () => {
    const payments = new FakePayments();
    const h = await new Harness({ payments, pricing: { minimumSeconds: 60, maxLeaseSeconds: 1000 } }).start();
    const owner = hex32();
    const { workload_id } = await h.spawn(owner, PAID_SPAWN);
    await vi.waitFor(() => expect(h.leases.get(workload_id)?.readyAt).toBeDefined(), WAIT);
    const before = h.leases.get(workload_id)!;

    payments.redeemGate = new Gate();
    const a = h.deliver(owner, { type: 'topup', workload_id, cashu_token: fakeToken(300_000) });
    const b = h.deliver(owner, { type: 'topup', workload_id, cashu_token: fakeToken(300_000) });
    await new Promise((r) => setTimeout(r, 50));
    payments.redeemGate.release();
    await Promise.all([a.done, b.done]);

    const replies = [a.requestId, b.requestId].map((id) => h.outbox.about(id)[0]!.message);
    expect(replies.map((r) => r.type)).toEqual(['topped_up', 'topped_up']);
    const extendedSeconds = replies.reduce((t, r) => t + (r.extended_seconds as number), 0);
    const refunded = replies.reduce((t, r) => t + (r.refund_msats as number), 0);
    const after = h.leases.get(workload_id)!;
    // Every second sold is in the lease, and every msat not refunded pays for one.
    expect(Date.parse(after.expiresAt) - Date.parse(before.expiresAt)).toBe(extendedSeconds * 1000);
    expect(after.paid?.msats).toBe(600_000 + 600_000 - refunded);
    expect(after.paidRefs).toEqual(expect.arrayContaining([a.requestId, b.requestId]));
    expect(secondsLeft(after)).toBeLessThanOrEqual(1000);
    expect(after.readyAt).toBe(before.readyAt);
  });
});

/** The real payment flow, except that the refund of a failed boot waits at a gate before it is journaled. */
class SlowOweFlow extends PaymentFlow {
  oweGate: Gate | undefined;
  override async owe(...args: Parameters<PaymentFlow['owe']>): ReturnType<PaymentFlow['owe']> {
    if (this.oweGate) await this.oweGate.passed;
    return super.owe(...args);
  }
}

describe('a paid guest that never boots', () => {
  it('takes no top-up once its refund is being counted: the token stays the consumer\'s, the refund is all the lease held', async () => {
    const payments = new FakePayments();
    const stateDir = mkdtempSync(join(tmpdir(), 'paygress-unit-'));
    const flow = new SlowOweFlow({ payments, journal: new PaymentJournal(stateDir), policy: { minimumSeconds: 60, maxLeaseSeconds: 86_400 }, logger: silentLogger });
    // No supervisor tick in between: it would close the dead VM's lease on its own.
    const h = await new Harness({ stateDir, payments, paymentFlow: flow, tickMs: 3_600_000 }).start();
    h.driver.boot = 'manual';
    const owner = hex32();
    const { workload_id, request_id } = await h.spawn(owner, PAID_SPAWN);

    flow.oweGate = new Gate();
    h.driver.kill(workload_id);
    await new Promise((r) => setTimeout(r, 50));
    const topup = h.deliver(owner, { type: 'topup', workload_id, cashu_token: fakeToken(300_000) });
    await topup.done;
    flow.oweGate.release();

    expect(h.outbox.about(topup.requestId)[0]!.message).toMatchObject({ type: 'error', code: 'not_found' });
    expect(payments.received.has(topup.requestId)).toBe(false);
    const failed = await h.outbox.next((s) => s.message.type === 'boot_failed', 'boot_failed');
    expect(failed.message).toMatchObject({ request_id, refund_msats: 600_000 });
  });

  it('its VM is deleted at the next start when a crash came between journaling the refund and deleting it', async () => {
    const payments = new FakePayments();
    const h = await new Harness({ payments }).start();
    h.driver.boot = 'manual';
    const owner = hex32();
    const { workload_id, request_id } = await h.spawn(owner, PAID_SPAWN);
    // The state a crash leaves right after the refund was journaled: the VM and its lease still there.
    const lease = h.leases.get(workload_id)!;
    const ctx = { ref: `${request_id}.boot`, kind: 'spawn' as const, sender: owner, channel: lease.channel, dialect: 'v1' as const, workloadId: workload_id };
    await h.payment!.owe(ctx, lease.paid!, { code: 'boot_failed', message: 'the VM did not become ready; your payment is refunded' });

    const after = await h.restart().start();
    const failed = await after.outbox.next((s) => s.message.type === 'boot_failed', 'boot_failed');
    expect(failed.message).toMatchObject({ request_id, refund_msats: 600_000 });
    expect(after.leases.get(workload_id)).toBeUndefined();
    expect(after.driver.get(workload_id)).toBeUndefined();
    expect(payments.refunded(`${request_id}.boot`)).toBe(600_000);
  });
});

describe('after a restart', () => {
  it('a spawn cut short after its swap, whose refund the mint cannot make yet, is told the refund is owed (not that nothing was kept), and gets the token at the next start', async () => {
    const payments = new FakePayments();
    const h = await new Harness({ payments }).start();
    h.driver.createGate = new Gate(); // the crash comes while the VM is being made, after the swap
    const { requestId } = h.deliver(hex32(), PAID_SPAWN);
    await vi.waitFor(() => expect(h.driver.createCalls).toHaveLength(1), WAIT);

    payments.failRefunds = 1;
    const second = await h.restart().start();
    const owed = second.outbox.about(requestId).map((s) => s.message);
    expect(owed).toEqual([expect.objectContaining({ type: 'error', paid_msats: 600_000, refund_msats: 600_000 })]);
    expect(owed[0]!.refund_token).toBeUndefined();
    expect(paymentRecord(second, requestId)?.phase).toBe('refunding');

    const third = await second.restart().start();
    expect(third.outbox.about(requestId).map((s) => s.message)).toEqual([expect.objectContaining({ type: 'error', refund_msats: 600_000, refund_token: expect.any(String) })]);
    expect(payments.refunded(requestId)).toBe(600_000);
    expect(paymentRecord(third, requestId)).toBeUndefined();
  });

  it('a spawn whose payment is still in doubt is not told nothing was kept by the spawn journal', async () => {
    const payments = new FakePayments();
    const h = new Harness({ payments });
    const requestId = hex32();
    const sender = hex32();
    const workloadId = 'w-0123456789ab';
    await h.inflight.begin({ requestId, sender, channel: 'nip17', workloadId, driver: h.driver.kind, startedAt: new Date().toISOString() });
    await h.paymentJournal!.put({ ref: requestId, kind: 'spawn', sender, channel: 'nip17', dialect: 'v1', workloadId, mint: 'http://127.0.0.1:9/fake-mint', unit: 'msat', phase: 'quoted', token: fakeToken(600_000), createdAt: new Date().toISOString() });
    payments.failNextRedeem = { error: new Error('socket hang up'), afterSwap: false };
    await h.start();
    expect(h.outbox.about(requestId)).toEqual([]);
    expect(paymentRecord(h, requestId)?.phase).toBe('quoted');
    expect(existsSync(join(h.stateDir, 'inflight', `${requestId}.json`))).toBe(false);
  });
});
