/**
 * A workload's life after its spawn was answered, in-process: ready, a death
 * during boot (one `boot_failed`) versus after it (one `workload_lost`), a boot
 * that never ends, a stop during boot, stops that race, expiry, and what a
 * shutdown leaves running.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { closeHarnesses, Harness, hex32, SPAWN, WAIT } from '../support/agent-harness.js';
import { Gate } from '../support/gate.js';

afterEach(async () => {
  vi.useRealTimers();
  await closeHarnesses();
});

/** Let the supervisor (10 ms ticks) look at the leases several times. */
const someTicks = () => new Promise((r) => setTimeout(r, 100));

describe('boot', () => {
  it('follows access details with ready and records readiness in the lease', async () => {
    const h = await new Harness().start();
    const { workload_id, request_id } = await h.spawn(hex32());
    const ready = await h.outbox.next((s) => s.message.type === 'ready', 'ready');
    expect(ready.route.replyTo).toBe(request_id);
    expect(ready.message.workload_id).toBe(workload_id);
    await vi.waitFor(() => expect(h.leases.get(workload_id)?.readyAt).toBeDefined(), WAIT);
    expect(h.workloads.phase(workload_id)).toBe('ready');
  });

  it('reports a death during boot once, as boot_failed, never as workload_lost, and deletes the workload', async () => {
    const h = await new Harness().start();
    h.driver.boot = 'manual';
    const { workload_id } = await h.spawn(hex32());
    await someTicks();
    h.driver.kill(workload_id);
    const failed = await h.outbox.next((s) => s.message.type === 'boot_failed', 'boot_failed');
    expect(failed.message).toMatchObject({ workload_id, reason: 'died' });
    await someTicks();
    expect(h.outbox.ofType('boot_failed')).toHaveLength(1);
    expect(h.outbox.ofType('workload_lost')).toEqual([]);
    expect(h.driver.workloads.has(workload_id)).toBe(false);
    expect(h.leases.get(workload_id)).toBeUndefined();
  });

  it('counts a workload as booting from its lease on: a death before the access details are handed over is still boot_failed', async () => {
    const h = await new Harness().start();
    h.driver.boot = 'manual';
    const gate = (h.outbox.gate = new Gate());
    const spawn = h.deliver(hex32(), SPAWN);
    await vi.waitFor(() => expect(h.leases.all()).toHaveLength(1), WAIT);
    const workloadId = h.leases.all()[0]!.workloadId;
    h.driver.kill(workloadId);
    // The supervisor looks while the reply is still on its way.
    await someTicks();
    h.outbox.gate = undefined;
    gate.release();
    await spawn.done;
    await h.outbox.next((s) => s.message.type === 'boot_failed', 'boot_failed');
    await someTicks();
    expect(h.outbox.sent.map((s) => s.message.type)).toEqual(['access_details', 'boot_failed']);
  });

  it('reports a death after ready once, as workload_lost, and frees the lease', async () => {
    const h = await new Harness().start();
    const owner = hex32();
    const { workload_id, request_id } = await h.spawn(owner);
    await h.outbox.next((s) => s.message.type === 'ready', 'ready');
    await vi.waitFor(() => expect(h.workloads.phase(workload_id)).toBe('ready'), WAIT);
    h.driver.kill(workload_id);
    const lost = await h.outbox.next((s) => s.message.type === 'workload_lost', 'workload_lost');
    expect(lost.route).toMatchObject({ to: owner, replyTo: request_id });
    await someTicks();
    expect(h.outbox.ofType('workload_lost')).toHaveLength(1);
    expect(h.outbox.ofType('boot_failed')).toEqual([]);
    expect(h.leases.get(workload_id)).toBeUndefined();
    expect(h.driver.workloads.has(workload_id)).toBe(false);
  });

  it('deletes a workload that misses the ready deadline, with boot_failed and the console tail', async () => {
    const h = await new Harness({ workloads: { readyTimeoutMs: 50 } }).start();
    h.driver.boot = 'never';
    const { workload_id } = await h.spawn(hex32());
    const failed = await h.outbox.next((s) => s.message.type === 'boot_failed', 'boot_failed');
    expect(failed.message).toMatchObject({ reason: 'timeout', console: `fake console of ${workload_id}` });
    expect(h.driver.workloads.has(workload_id)).toBe(false);
    expect(h.leases.get(workload_id)).toBeUndefined();
  });

  it('answers a stop during boot with stopped, and reports no boot failure for it', async () => {
    const h = await new Harness().start();
    h.driver.boot = 'manual';
    const owner = hex32();
    const { workload_id } = await h.spawn(owner);
    expect(await h.request(owner, { type: 'stop', workload_id })).toMatchObject({ type: 'stopped', workload_id });
    await someTicks();
    expect(h.outbox.sent.map((s) => s.message.type)).toEqual(['access_details', 'stopped']);
    expect(h.driver.workloads.has(workload_id)).toBe(false);
  });
});

describe('stop', () => {
  it('shares one teardown between stops that race, and the supervisor leaves a stopping workload alone', async () => {
    const h = await new Harness().start();
    const owner = hex32();
    const { workload_id } = await h.spawn(owner);
    await h.outbox.next((s) => s.message.type === 'ready', 'ready');
    const gate = (h.driver.destroyGate = new Gate());
    const first = h.deliver(owner, { type: 'stop', workload_id });
    const second = h.deliver(owner, { type: 'stop', workload_id });
    await vi.waitFor(() => expect(h.driver.destroyCalls).toHaveLength(1), WAIT);
    // A guest slow to stop is not lost: no notice while its stop runs.
    h.driver.kill(workload_id);
    await someTicks();
    h.driver.destroyGate = undefined;
    gate.release();
    await Promise.all([first.done, second.done]);
    expect(h.driver.destroyCalls).toEqual([workload_id]);
    expect(h.outbox.about(first.requestId)[0]?.message.type).toBe('stopped');
    expect(h.outbox.about(second.requestId)[0]?.message.type).toBe('stopped');
    expect(h.outbox.ofType('workload_lost')).toEqual([]);
  });

  it('leaves no lease behind when a stop comes while readiness is being recorded', async () => {
    const h = await new Harness().start();
    const owner = hex32();
    const { workload_id } = await h.spawn(owner);
    await h.outbox.next((s) => s.message.type === 'ready', 'ready');
    // At once: the lease write that records readiness is still under way.
    expect(await h.request(owner, { type: 'stop', workload_id })).toMatchObject({ type: 'stopped' });
    await someTicks();
    expect(h.leases.get(workload_id)).toBeUndefined();
    expect(existsSync(join(h.stateDir, 'leases', `${workload_id}.json`))).toBe(false);
    expect(h.outbox.ofType('workload_lost')).toEqual([]);
  });
});

describe('expiry', () => {
  it('warns once before the end, then stops the workload and says expired', async () => {
    // Only Date is faked: the supervisor's timer and the stores' file I/O stay real.
    vi.useFakeTimers({ toFake: ['Date'] });
    const h = await new Harness({ workloads: { warnBeforeSeconds: 60 } }).start();
    const owner = hex32();
    const { workload_id, expires_at } = await h.spawn(owner);
    expect(Date.parse(String(expires_at)) - Date.now()).toBe(3600_000);
    await h.outbox.next((s) => s.message.type === 'ready', 'ready');

    vi.setSystemTime(Date.now() + 3600_000 - 30_000);
    const expiring = await h.outbox.next((s) => s.message.type === 'expiring', 'expiring');
    expect(expiring.message).toMatchObject({ workload_id, seconds_left: 30 });
    expect(expiring.route.to).toBe(owner);
    await someTicks();
    expect(h.outbox.ofType('expiring')).toHaveLength(1);
    expect(h.driver.workloads.has(workload_id)).toBe(true);

    vi.setSystemTime(Date.now() + 30_000);
    const expired = await h.outbox.next((s) => s.message.type === 'expired', 'expired');
    expect(expired.message).toMatchObject({ workload_id, seconds_left: 0 });
    expect(h.driver.workloads.has(workload_id)).toBe(false);
    expect(h.leases.get(workload_id)).toBeUndefined();
    await someTicks();
    expect(h.outbox.sent.map((s) => s.message.type)).toEqual(['access_details', 'ready', 'expiring', 'expired']);
  });
});

describe('shutdown', () => {
  it('finishes the spawn in flight, takes nothing new, and leaves booting workloads running without judging them', async () => {
    const h = await new Harness().start();
    h.driver.boot = 'manual';
    const booting = await h.spawn(hex32());
    const gate = (h.driver.createGate = new Gate());
    const inFlight = h.deliver(hex32(), SPAWN);
    await vi.waitFor(() => expect(h.driver.createCalls).toHaveLength(2), WAIT);

    const stopped = h.stop();
    const late = h.deliver(hex32(), SPAWN);
    await late.done;
    expect(h.outbox.about(late.requestId)).toEqual([]);
    // Not claimed: the relays deliver it again after the restart.
    expect(h.seen.has(late.requestId)).toBe(false);

    h.driver.createGate = undefined;
    gate.release();
    await stopped;
    expect(h.outbox.about(inFlight.requestId)[0]?.message.type).toBe('access_details');
    expect(h.outbox.ofType('boot_failed')).toEqual([]);
    expect(h.driver.get(booting.workload_id)?.alive).toBe(true);
    expect(h.driver.workloads.size).toBe(2);
    expect(h.driver.closed).toBe(true);
  });
});
