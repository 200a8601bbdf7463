/**
 * The request pipeline in-process (fake driver, in-memory outbox, real stores):
 * who may touch a workload, what admission refuses and that every refusal or
 * failure gives its reservation back, and at-most-once handling.
 */
import { afterEach, describe, expect, it, vi } from 'vitest';
import { DriverError } from '../../src/drivers/types.js';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { closeHarnesses, Harness, hex32, SPAWN, WAIT } from '../support/agent-harness.js';
import { FakeDriver } from '../support/fake-driver.js';
import { Gate } from '../support/gate.js';

afterEach(closeHarnesses);

describe('ownership', () => {
  it('answers stop and status by another key with not_found, the same answer as for no workload at all, and leaves the workload alone', async () => {
    const h = await new Harness().start();
    const owner = hex32();
    const stranger = hex32();
    const { workload_id } = await h.spawn(owner);

    const stop = await h.request(stranger, { type: 'stop', workload_id });
    const status = await h.request(stranger, { type: 'status', workload_id });
    expect(stop).toMatchObject({ type: 'error', code: 'not_found' });
    expect(status).toMatchObject({ type: 'error', code: 'not_found' });
    expect(h.driver.destroyCalls).toEqual([]);
    expect(h.leases.get(workload_id)?.owner).toBe(owner);

    // Nothing tells a stranger whether the id exists.
    const missing = await h.request(stranger, { type: 'status', workload_id: 'w-000000000000' });
    const strip = (m: Record<string, unknown> | undefined) => ({ ...m, request_id: undefined, message: String(m?.message).replace(/w-[0-9a-f]{12}/, 'ID') });
    expect(strip(status)).toEqual(strip(missing));

    expect(await h.request(owner, { type: 'status', workload_id })).toMatchObject({ type: 'status', state: 'running', workload_id });
    expect(await h.request(owner, { type: 'stop', workload_id })).toMatchObject({ type: 'stopped', workload_id });
    expect(h.driver.get(workload_id)).toBeUndefined();
    expect(h.leases.get(workload_id)).toBeUndefined();
  });

  it('reports a workload whose process died as gone in status', async () => {
    const h = await new Harness({ tickMs: 60_000 }).start();
    const owner = hex32();
    const { workload_id } = await h.spawn(owner);
    await h.outbox.next((s) => s.message.type === 'ready', 'ready');
    h.driver.kill(workload_id);
    expect(await h.request(owner, { type: 'status', workload_id })).toMatchObject({ type: 'status', state: 'gone' });
  });
});

describe('admission', () => {
  it('holds each key to its own cap and tells it quota_exceeded; other keys still get in', async () => {
    const h = await new Harness({ limits: { maxVmsPerSender: 1 } }).start();
    const a = hex32();
    const first = await h.spawn(a);
    expect(await h.request(a, SPAWN)).toMatchObject({ type: 'error', code: 'quota_exceeded' });
    await h.spawn(hex32());
    // Stopping frees the key's slot.
    await h.request(a, { type: 'stop', workload_id: first.workload_id });
    await h.spawn(a);
    expect(h.driver.createCalls).toHaveLength(3);
  });

  it('refuses beyond the host-wide cap and beyond the host capacity with capacity_exhausted', async () => {
    const h = await new Harness({ limits: { maxVms: 2, hostCapacity: { vcpus: 5, memoryMb: 1_000_000 } } }).start();
    await h.spawn(hex32(), { plan: 'big' }); // 4 of 5 vCPUs
    expect(await h.request(hex32(), { ...SPAWN, plan: 'big' })).toMatchObject({ type: 'error', code: 'capacity_exhausted' });
    await h.spawn(hex32()); // 5 of 5, second of two workloads
    expect(await h.request(hex32(), SPAWN)).toMatchObject({ type: 'error', code: 'capacity_exhausted' });
    expect(h.driver.createCalls).toHaveLength(2);
    expect(h.admission.inFlight).toBe(0);
  });

  it('answers busy while spawns in flight fill their bound, and admits again once they end', async () => {
    const h = await new Harness({ limits: { maxSpawnsInFlight: 1 } }).start();
    const gate = (h.driver.createGate = new Gate());
    const slow = h.deliver(hex32(), SPAWN);
    await vi.waitFor(() => expect(h.driver.createCalls).toHaveLength(1), WAIT);
    expect(await h.request(hex32(), SPAWN)).toMatchObject({ type: 'error', code: 'busy' });
    h.driver.createGate = undefined;
    gate.release();
    await slow.done;
    expect(h.outbox.about(slow.requestId)[0]?.message.type).toBe('access_details');
    await h.spawn(hex32());
  });

  it('releases the reservation when the driver fails, and answers spawn_failed or capacity_exhausted without the driver’s words', async () => {
    const h = await new Harness({ limits: { maxSpawnsInFlight: 1, maxVmsPerSender: 1 } }).start();
    const key = hex32();
    h.driver.failNextCreate = new DriverError('launch_failed', 'qemu said /var/lib/secret/path is broken');
    const failed = await h.request(key, SPAWN);
    expect(failed).toMatchObject({ type: 'error', code: 'spawn_failed' });
    expect(String(failed?.message)).not.toContain('/var/lib');
    h.driver.failNextCreate = new DriverError('capacity', 'no free port');
    expect(await h.request(key, SPAWN)).toMatchObject({ type: 'error', code: 'capacity_exhausted' });
    expect(h.admission.inFlight).toBe(0);
    expect(h.driver.workloads.size).toBe(0);
    expect(h.leases.all()).toEqual([]);
    expect(h.inflight.leftovers()).toEqual([]);
    // Neither the in-flight slot nor the key's single slot is still held.
    await h.spawn(key);
  });

  it('gives the VM back when its lease cannot be written, and answers internal_error', async () => {
    const h = await new Harness().start();
    // A file where the lease directory was: the lease write fails for real.
    const dir = join(h.stateDir, 'leases');
    rmSync(dir, { recursive: true });
    writeFileSync(dir, '');
    expect(await h.request(hex32(), SPAWN)).toMatchObject({ type: 'error', code: 'internal_error' });
    const [spec] = h.driver.createCalls;
    expect(h.driver.destroyCalls).toEqual([spec!.id]);
    expect(h.driver.workloads.size).toBe(0);
    expect(h.admission.inFlight).toBe(0);
  });

  it('refuses what no offered tier or plan allows before anything is reserved or created', async () => {
    const h = await new Harness().start();
    expect(await h.request(hex32(), { ...SPAWN, isolation: 'attested-research-tier' })).toMatchObject({ code: 'isolation_unavailable' });
    expect(await h.request(hex32(), { ...SPAWN, plan: 'huge' })).toMatchObject({ code: 'unknown_plan' });
    expect(await h.request(hex32(), { ...SPAWN, vcpus: 2 })).toMatchObject({ code: 'exceeds_plan' });
    expect(await h.request(hex32(), '{"type":"spawn"')).toMatchObject({ code: 'invalid_request' });
    expect(h.driver.createCalls).toEqual([]);
  });
});

describe('at most once', () => {
  it('runs a request delivered twice (two relays, at once or later) once and answers once', async () => {
    const h = await new Harness().start();
    const key = hex32();
    const ids = { requestId: hex32(), eventId: hex32() };
    const a = h.deliver(key, SPAWN, ids);
    const b = h.deliver(key, SPAWN, ids);
    // The same rumor in a different wrap (another relay re-wrapped nothing, but a resend would).
    const c = h.deliver(key, SPAWN, { requestId: ids.requestId });
    await Promise.all([a.done, b.done, c.done]);
    const d = h.deliver(key, SPAWN, ids);
    await d.done;
    expect(h.driver.createCalls).toHaveLength(1);
    expect(h.outbox.about(ids.requestId).filter((s) => s.message.type === 'access_details')).toHaveLength(1);
  });

  it('remembers taken requests across a restart', async () => {
    const h = await new Harness().start();
    const key = hex32();
    const ids = { requestId: hex32(), eventId: hex32() };
    await h.deliver(key, SPAWN, ids).done;
    await h.stop();
    const again = await h.restart().start();
    await again.deliver(key, SPAWN, ids).done;
    expect(h.driver.createCalls).toHaveLength(1);
    expect(again.outbox.about(ids.requestId).filter((s) => s.message.type === 'access_details')).toEqual([]);
  });
  it('keeps a clock_skew refusal dated far ahead from one read window ahead at most, not from its own date', async () => {
    const h = await new Harness().start();
    const requestId = hex32();
    const content = JSON.stringify({ type: 'status', workload_id: 'w-000000000000' });
    await h.agent.handle({ dedupeIds: [hex32(), requestId], requestId, sender: hex32(), channel: 'nip17', content, createdAt: 253_402_300_799 });
    const after = Math.floor(Date.now() / 1000);
    expect(h.outbox.about(requestId)[0]?.message).toMatchObject({ type: 'error', code: 'clock_skew' });
    const dates = readFileSync(join(h.stateDir, 'seen.log'), 'utf8').trim().split('\n').map((line) => Number(line.split(' ')[0]));
    expect(dates).toHaveLength(2);
    for (const t of dates) expect(t).toBeLessThanOrEqual(after + 2 * 86_400 + 3600);
  });

  it('drops the other relay copies of a refusal whose claim could not be recorded, instead of judging each again', async () => {
    const h = await new Harness().start();
    // A folder where seen.log should be: every append fails, as on a full disk.
    rmSync(join(h.stateDir, 'seen.log'), { force: true });
    mkdirSync(join(h.stateDir, 'seen.log'));
    const requestId = hex32();
    const content = JSON.stringify({ type: 'status', workload_id: 'w-000000000000' });
    const msg = { dedupeIds: [hex32(), requestId], requestId, sender: hex32(), channel: 'nip17', content, createdAt: Math.floor(Date.now() / 1000) + 3600 };
    await h.agent.handle(msg);
    await h.agent.handle({ ...msg });
    expect(h.agent.stats().duplicates).toBe(1);
    expect(h.outbox.about(requestId)).toEqual([]);
  });
});
