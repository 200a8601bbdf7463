/**
 * What a restarted agent decides about what the previous run left, in-process:
 * the spawn journal (a crash mid-spawn is still answered), leases whose
 * workloads live or died while it was down, and workloads no lease claims.
 * A "crash" is `Harness.restart()`: same state directory, same driver, the old
 * agent abandoned where it stood.
 */
import { afterEach, describe, expect, it, vi } from 'vitest';
import { closeHarnesses, Harness, hex32, SPAWN, WAIT } from '../support/agent-harness.js';
import { Gate } from '../support/gate.js';

afterEach(closeHarnesses);

describe('spawn journal', () => {
  it('answers a spawn cut off before its lease with spawn_failed, and frees what it took', async () => {
    const h = await new Harness().start();
    const sender = hex32();
    h.driver.createGate = new Gate(); // never released: the process dies inside create
    const spawn = h.deliver(sender, SPAWN);
    await vi.waitFor(() => expect(h.driver.createCalls).toHaveLength(1), WAIT);
    const workloadId = h.driver.createCalls[0]!.id;
    expect(h.inflight.leftovers().map((e) => e.requestId)).toEqual([spawn.requestId]);

    h.driver.createGate = undefined;
    const after = await h.restart().start();
    const answer = await after.outbox.next((s) => s.route.replyTo === spawn.requestId, 'an answer to the interrupted spawn');
    expect(answer.route.to).toBe(sender);
    expect(answer.message).toMatchObject({ type: 'error', code: 'spawn_failed', request_id: spawn.requestId });
    expect(after.driver.destroyCalls).toContain(workloadId);
    expect(after.driver.workloads.size).toBe(0);
    expect(after.inflight.leftovers()).toEqual([]);
    expect(after.outbox.sent).toHaveLength(1);
  });

  it('sends the access details again for a spawn cut off after its lease, once, and then its ready', async () => {
    const h = await new Harness().start();
    const sender = hex32();
    h.driver.boot = 'manual';
    h.outbox.gate = new Gate(); // the reply never reaches a relay before the crash
    const spawn = h.deliver(sender, SPAWN);
    await vi.waitFor(() => expect(h.leases.all()).toHaveLength(1), WAIT);
    const lease = h.leases.all()[0]!;

    const after = await h.restart().start();
    const details = await after.outbox.next((s) => s.message.type === 'access_details', 'access details');
    expect(details.route).toMatchObject({ to: sender, replyTo: spawn.requestId });
    expect(details.message).toMatchObject({ workload_id: lease.workloadId, ssh_port: lease.sshPort, expires_at: lease.expiresAt });
    expect(after.inflight.leftovers()).toEqual([]);
    // Its readiness watch resumed: the boot is still followed up.
    after.driver.markReady(lease.workloadId);
    await after.outbox.next((s) => s.message.type === 'ready', 'ready');
    expect(after.outbox.sent.map((s) => s.message.type)).toEqual(['access_details', 'ready']);
    expect(after.driver.destroyCalls).toEqual([]);
  });
});

describe('reconciliation', () => {
  it('re-adopts live workloads, closes the leases of dead ones, and removes what no lease claims', async () => {
    const h = await new Harness().start();
    const owner = hex32();
    const ready = await h.spawn(owner);
    await vi.waitFor(() => expect(h.leases.get(ready.workload_id)?.readyAt).toBeDefined(), WAIT);
    h.driver.boot = 'manual';
    const booting = await h.spawn(owner);
    const dies = await h.spawn(owner);

    // While the agent is down: one workload dies, an earlier run's workload
    // without a lease still runs, and a half-made one left its remains.
    const down = h.restart();
    h.driver.kill(dies.workload_id);
    h.driver.plant('w-0000000000aa', { alive: true });
    h.driver.plant('w-0000000000bb', { alive: false });
    await down.start();
    expect(down.workloads.phase(ready.workload_id)).toBe('ready');
    expect(down.workloads.phase(booting.workload_id)).toBe('booting');
    expect(down.workloads.phase(dies.workload_id)).toBeUndefined();

    expect([...down.driver.workloads.keys()].sort()).toEqual([ready.workload_id, booting.workload_id].sort());
    expect(down.leases.all().map((l) => l.workloadId).sort()).toEqual([ready.workload_id, booting.workload_id].sort());
    expect(down.driver.destroyCalls.sort()).toEqual([dies.workload_id, 'w-0000000000aa', 'w-0000000000bb'].sort());
    const lost = await down.outbox.next((s) => s.message.type === 'workload_lost', 'workload_lost');
    expect(lost.route).toMatchObject({ to: owner, replyTo: dies.request_id });
    expect(lost.message.workload_id).toBe(dies.workload_id);

    // The booting one is watched again; the ready one is left alone.
    down.driver.markReady(booting.workload_id);
    const readyAgain = await down.outbox.next((s) => s.message.type === 'ready', 'ready');
    expect(readyAgain.message.workload_id).toBe(booting.workload_id);
    expect(down.outbox.sent.map((s) => s.message.type).sort()).toEqual(['ready', 'workload_lost']);

    // Re-adopted workloads are the owner's as before.
    expect(await down.request(owner, { type: 'stop', workload_id: ready.workload_id })).toMatchObject({ type: 'stopped' });
  });

  it('counts re-adopted workloads against admission after a restart', async () => {
    const h = await new Harness({ limits: { maxVmsPerSender: 1 } }).start();
    const owner = hex32();
    await h.spawn(owner);
    const after = await h.restart().start();
    expect(await after.request(owner, SPAWN)).toMatchObject({ type: 'error', code: 'quota_exceeded' });
  });
});
