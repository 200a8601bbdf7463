/**
 * One consumer's spawn (B1, B2) and stop (B5) through the real agent, timed
 * from the DM sent to the reply received; a stop also times qemu's exit.
 */
import { randomBytes } from 'node:crypto';
import type { ConsumerClient, ReplyMessage } from '../src/client/consumer.js';
import { findVmPids, isAlive } from '../src/drivers/kvm/process.js';
import type { SpawnPhases } from './phases.js';

/** The agent's `tiny` plan (test/support/agent-process.ts); the floor launches the same VM. */
export const PLAN = { id: 'tiny', vcpus: 1, memoryMb: 256, diskGb: 2 };
const REPLY_TIMEOUT_MS = 120_000;

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export function password(): string {
  return randomBytes(15).toString('base64url');
}

/** Resolves with the time qemu `pid` was seen gone; polled finely (2 ms) so the stamp is accurate. */
async function watchGone(pid: number, timeoutMs: number): Promise<number> {
  const end = performance.now() + timeoutMs;
  while (await isAlive(pid)) {
    if (performance.now() > end) throw new Error(`qemu ${pid} still alive after ${timeoutMs} ms`);
    await sleep(2);
  }
  return performance.now();
}

function expectType(r: ReplyMessage, type: string): void {
  if (r.type !== type) throw new Error(`expected a ${type} reply, got ${JSON.stringify(r).slice(0, 300)}`);
}

export interface SpawnSample {
  e2eMs: number;
  workloadId: string;
  phases: SpawnPhases;
}

export async function spawnOnce(client: ConsumerClient): Promise<SpawnSample> {
  const t0 = performance.now();
  const r = await client.request({ type: 'spawn', root_password: password(), plan: PLAN.id }, { timeoutMs: REPLY_TIMEOUT_MS });
  const e2eMs = performance.now() - t0;
  expectType(r, 'access_details');
  const workloadId = String(r.workload_id);
  return { e2eMs, workloadId, phases: {} };
}

export interface StopSample {
  replyMs: number;
  goneMs: number;
}

export async function stopOnce(client: ConsumerClient, workloadId: string): Promise<StopSample> {
  const [pid] = await findVmPids(`paygress-${workloadId}`);
  if (pid === undefined) throw new Error(`no qemu found for ${workloadId}`);
  const t0 = performance.now();
  const gone = watchGone(pid, REPLY_TIMEOUT_MS);
  const r = await client.request({ type: 'stop', workload_id: workloadId }, { timeoutMs: REPLY_TIMEOUT_MS });
  const replyAt = performance.now();
  expectType(r, 'stopped');
  return { replyMs: replyAt - t0, goneMs: (await gone) - t0 };
}
