/**
 * `Workloads`, the one owner of a workload's life, seen through its phases
 * (docs/lifecycle.md): each step of a spawn and a stop, where a failed boot
 * and a failed teardown leave a workload, and when the spawn journal ends
 * (the phases a restart decides are checked in agent-restart.test.ts).
 */
import { afterEach, describe, expect, it, vi } from 'vitest';
import { DriverError } from '../../src/drivers/types.js';
import { closeHarnesses, Harness, hex32, SPAWN, WAIT } from '../support/agent-harness.js';
import { Gate } from '../support/gate.js';

afterEach(closeHarnesses);

describe('phases', () => {
  it('walks spawning → booting → ready → stopping → gone', async () => {
    const h = await new Harness().start();
    h.driver.boot = 'manual';
    const owner = hex32();
    const createGate = (h.driver.createGate = new Gate());
    const spawn = h.deliver(owner, SPAWN);
    await vi.waitFor(() => expect(h.driver.createCalls).toHaveLength(1), WAIT);
    const id = h.driver.createCalls[0]!.id;
    expect(h.workloads.phase(id)).toBe('spawning');

    h.driver.createGate = undefined;
    createGate.release();
    await spawn.done;
    expect(h.workloads.phase(id)).toBe('booting');

    h.driver.markReady(id);
    await h.outbox.next((s) => s.message.type === 'ready', 'ready');
    expect(h.workloads.phase(id)).toBe('ready');

    const destroyGate = (h.driver.destroyGate = new Gate());
    const stop = h.deliver(owner, { type: 'stop', workload_id: id });
    await vi.waitFor(() => expect(h.driver.destroyCalls).toEqual([id]), WAIT);
    expect(h.workloads.phase(id)).toBe('stopping');
    expect(h.workloads.isEnding(id)).toBe(true);

    h.driver.destroyGate = undefined;
    destroyGate.release();
    await stop.done;
    expect(h.workloads.phase(id)).toBeUndefined();
    expect(h.leases.get(id)).toBeUndefined();
  });

  it('forgets a workload whose create failed', async () => {
    const h = await new Harness().start();
    h.driver.failNextCreate = new DriverError('launch_failed', 'qemu exited');
    expect(await h.request(hex32(), SPAWN)).toMatchObject({ type: 'error', code: 'spawn_failed' });
    const id = h.driver.createCalls[0]!.id;
    expect(h.workloads.phase(id)).toBeUndefined();
    expect(h.inflight.leftovers()).toEqual([]);
  });

  it('ends a failed boot through stopping; a stop meanwhile joins its teardown', async () => {
    const h = await new Harness().start();
    h.driver.boot = 'manual';
    const owner = hex32();
    const { workload_id } = await h.spawn(owner);
    const destroyGate = (h.driver.destroyGate = new Gate());
    h.driver.kill(workload_id);
    await vi.waitFor(() => expect(h.workloads.phase(workload_id)).toBe('stopping'), WAIT);
    // A stop now joins the teardown under way instead of starting another.
    const stop = h.deliver(owner, { type: 'stop', workload_id });
    h.driver.destroyGate = undefined;
    destroyGate.release();
    await stop.done;
    await h.outbox.next((s) => s.message.type === 'boot_failed', 'boot_failed');
    expect(h.driver.destroyCalls).toEqual([workload_id]);
    expect(h.workloads.phase(workload_id)).toBeUndefined();
  });

  it('leaves a workload whose teardown failed leased and ready, for its owner and the supervisor to try again', async () => {
    const h = await new Harness().start();
    const owner = hex32();
    const { workload_id } = await h.spawn(owner);
    await h.outbox.next((s) => s.message.type === 'ready', 'ready');
    h.driver.failNextDestroy = new Error('device busy');
    expect(await h.request(owner, { type: 'stop', workload_id })).toMatchObject({ type: 'error', code: 'internal_error' });
    expect(h.leases.get(workload_id)).toBeDefined();
    expect(h.workloads.phase(workload_id)).toBe('ready');
    // Still the owner's: a second stop goes through.
    expect(await h.request(owner, { type: 'stop', workload_id })).toMatchObject({ type: 'stopped', workload_id });
    expect(h.workloads.phase(workload_id)).toBeUndefined();
  });

  it('gives a boot whose stop failed back to its watch: a death during that boot is still boot_failed', async () => {
    const h = await new Harness().start();
    h.driver.boot = 'manual';
    const owner = hex32();
    const { workload_id } = await h.spawn(owner);
    expect(h.workloads.phase(workload_id)).toBe('booting');
    h.driver.failNextDestroy = new Error('device busy');
    expect(await h.request(owner, { type: 'stop', workload_id })).toMatchObject({ type: 'error', code: 'internal_error' });
    expect(h.workloads.phase(workload_id)).toBe('booting');
    h.driver.kill(workload_id);
    await h.outbox.next((s) => s.message.type === 'boot_failed', 'boot_failed');
    await vi.waitFor(() => expect(h.leases.get(workload_id)).toBeUndefined(), WAIT);
  });
});

describe('the spawn journal', () => {
  it('stands until the answer is in the outbox, and ends right after', async () => {
    const h = await new Harness().start();
    const gate = (h.outbox.gate = new Gate());
    const spawn = h.deliver(hex32(), SPAWN);
    await vi.waitFor(() => expect(h.leases.all()).toHaveLength(1), WAIT);
    expect(h.inflight.leftovers().map((e) => e.requestId)).toEqual([spawn.requestId]);
    h.outbox.gate = undefined;
    gate.release();
    await spawn.done;
    expect(h.inflight.leftovers()).toEqual([]);
  });

  it('stands through the answer to a failed create too', async () => {
    const h = await new Harness().start();
    h.driver.failNextCreate = new DriverError('capacity', 'no port');
    const gate = (h.outbox.gate = new Gate());
    const spawn = h.deliver(hex32(), SPAWN);
    await vi.waitFor(() => expect(h.driver.createCalls).toHaveLength(1), WAIT);
    await vi.waitFor(() => expect(h.inflight.leftovers().map((e) => e.requestId)).toEqual([spawn.requestId]), WAIT);
    h.outbox.gate = undefined;
    gate.release();
    await spawn.done;
    expect(h.outbox.about(spawn.requestId)[0]?.message).toMatchObject({ type: 'error', code: 'capacity_exhausted' });
    expect(h.inflight.leftovers()).toEqual([]);
  });
});
