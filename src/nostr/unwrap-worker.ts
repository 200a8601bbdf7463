/**
 * Worker thread of UnwrapPool (unwrap-pool.ts): runs `openDm` off the main
 * thread. The secret key arrives once, in `workerData`; each message is one
 * event in and one plain `OpenResult` out. Nothing here logs.
 *
 * The thread ends itself, between two events, when asked to (`exit`), or when
 * its crash flag is set (tests): it is never terminated from outside while it
 * may be inside the native ECDH, whose JS callback would abort the process.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { openDm } from './dm.js';
import type { NostrEvent } from './types.js';

export interface UnwrapWorkerData {
  sk: Uint8Array;
  pubkey: string;
  /** [0] = 1: die before the next message, without answering (a crash, for tests). */
  control: Int32Array;
}
/** `signatureChecked`: the main thread verified this event (unchanged) before posting its copy. */
export type UnwrapRequest = { type: 'open'; id: number; event: NostrEvent; signatureChecked: boolean } | { type: 'exit' } | { type: 'ping' };

const { sk, pubkey, control } = workerData as UnwrapWorkerData;
// One key object for the worker's life: fast-crypto caches the ECDH state per key object.
const key = new Uint8Array(sk);

parentPort?.on('message', (msg: UnwrapRequest) => {
  if (Atomics.load(control, 0) === 1) process.exit(70);
  if (msg.type === 'exit') process.exit(0);
  if (msg.type !== 'open') return;
  // openDm is total (never throws), so a hostile event cannot end this thread.
  parentPort?.postMessage({ id: msg.id, result: openDm(msg.event, key, pubkey, { signatureChecked: msg.signatureChecked }) });
});
