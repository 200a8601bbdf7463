/**
 * Worker thread of UnwrapPool (unwrap-pool.ts): runs `openDm` off the main
 * thread. The secret key arrives once, in `workerData`; each message is one
 * event in and one plain `OpenResult` out. Nothing here logs.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { openDm } from './dm.js';
import type { NostrEvent } from './types.js';

export interface UnwrapWorkerData {
  sk: Uint8Array;
  pubkey: string;
}
export interface UnwrapRequest {
  id: number;
  event: NostrEvent;
}

const { sk, pubkey } = workerData as UnwrapWorkerData;
// One key object for the worker's life: fast-crypto caches the ECDH state per key object.
const key = new Uint8Array(sk);

parentPort?.on('message', (msg: UnwrapRequest) => {
  // openDm is total (never throws), so a hostile event cannot end this thread.
  parentPort?.postMessage({ id: msg.id, result: openDm(msg.event, key, pubkey) });
});
