/**
 * Opens DMs (`openDm`) off the main thread when they arrive faster than one
 * thread can open them: a flood of DMs must not starve the event loop.
 *
 * Two modes:
 * - Quiet: events are opened on the main thread, one per event-loop turn
 *   (setImmediate), so I/O still runs between two unwraps and an idle agent
 *   pays no worker's memory.
 * - Flood: once more than `minBacklog` events wait, `size` worker threads start
 *   (unwrap-worker) and take every new and waiting event; the main thread only
 *   parses frames and posts messages. After `idleMs` with nothing to open the
 *   workers end and the pool is quiet again.
 *
 * Every `open()` settles exactly once with `openDm`'s answer and never rejects.
 * A worker that dies is replaced; the events it held are opened once more on
 * the main thread (openDm is pure, so a result a dead worker computed but never
 * delivered is simply computed again). Workers that die before answering
 * anything three times in a row are given up on: the pool stays on the main
 * thread and says so in the log.
 *
 * The secret key goes to each worker once, in `workerData`; it is never logged
 * and never part of a message.
 */
import os from 'node:os';
import { Worker } from 'node:worker_threads';
import { openDm, type OpenResult } from './dm.js';
import { wasVerified } from './fast-crypto.js';
import type { NostrEvent } from './types.js';
import type { UnwrapRequest, UnwrapWorkerData } from './unwrap-worker.js';
import type { Logger } from '../util/logger.js';

export interface UnwrapPoolOptions {
  sk: Uint8Array;
  pubkey: string;
  /**
   * Worker threads in a flood. Default: CPUs − 1 (at least 1), leaving the main
   * thread a core for parsing, signature checks of incoming frames and I/O
   * (more workers than spare cores open no faster and delay the main thread;
   * docs/performance.md).
   */
  size?: number;
  /** Workers start once more than this many events wait for the main thread. Default 16: an ordinary burst (tens of ms of unwrapping) stays on the main thread and costs no worker memory. */
  minBacklog?: number;
  /** Workers end after this long with nothing to open. Default 60 s. */
  idleMs?: number;
  logger?: Logger;
}

export interface UnwrapPoolStats {
  /** Live worker threads now. */
  workers: number;
  /** Worker threads started so far (replacements included). */
  workersStarted: number;
  /** Worker threads that died unasked. */
  crashes: number;
  /** Events opened on the main thread (quiet mode and crash retries). */
  openedOnMain: number;
  /** Events opened by a worker. */
  openedInWorkers: number;
  /** Events a dead worker held, opened again on the main thread. */
  retriedOnMain: number;
  /** Events accepted and not settled yet. */
  pending: number;
}

interface Job {
  id: number;
  event: NostrEvent;
  resolve: (r: OpenResult) => void;
  /** A dead worker held it: it is opened on the main thread, never sent to a worker again. */
  retry?: boolean;
}

interface Slot {
  worker: Worker;
  /** Shared with the worker: [0] = 1 makes it die before its next message (crashOneWorkerForTest). */
  control: Int32Array;
  inflight: Map<number, Job>;
  answered: number;
  /** Set when the pool ends this worker itself (idle, close): its exit is no crash. */
  retiring: boolean;
}

/** Events posted to one worker before it answers: enough to keep it busy across a message round trip, few to retry if it dies. */
const PER_WORKER_INFLIGHT = 4;
const MAX_FAILED_STARTS = 3;
/** A worker asked to end has this long to do so before it is terminated (it only ever has a few events to finish). */
const RETIRE_GRACE_MS = 5_000;

/**
 * How to start a worker: the compiled `unwrap-worker.js` next to this module
 * in dist/, or, when this module is the `.ts` source (tsx, vitest), a small
 * bootstrap that registers tsx's loader inside the worker and then imports
 * `unwrap-worker.ts` (on Node 20 `execArgv: ['--import', 'tsx']` does not
 * reach a worker's entry module: ERR_UNKNOWN_FILE_EXTENSION).
 */
function workerStart(): { entry: URL | string; eval: boolean } {
  if (!import.meta.url.endsWith('.ts')) return { entry: new URL('./unwrap-worker.js', import.meta.url), eval: false };
  const tsxApi = import.meta.resolve('tsx/esm/api');
  const source = new URL('./unwrap-worker.ts', import.meta.url).href;
  return {
    entry: `import(${JSON.stringify(tsxApi)}).then((m) => { m.register(); return import(${JSON.stringify(source)}); });`,
    eval: true,
  };
}

export class UnwrapPool {
  private readonly sk: Uint8Array;
  private readonly pubkey: string;
  /** Worker threads a flood starts. */
  readonly size: number;
  private readonly minBacklog: number;
  private readonly idleMs: number;
  private readonly log: Logger | undefined;

  private readonly mainQueue: Job[] = [];
  private mainScheduled = false;
  private readonly workerQueue: Job[] = [];
  private readonly slots: Slot[] = [];
  private flood = false;
  private workersBroken = false;
  private failedStarts = 0;
  private idleTimer: NodeJS.Timeout | undefined;
  private closed = false;
  private nextId = 1;
  private readonly settleWaiters = new Set<() => void>();
  private readonly counts = { workersStarted: 0, crashes: 0, openedOnMain: 0, openedInWorkers: 0, retriedOnMain: 0, pending: 0 };

  constructor(opts: UnwrapPoolOptions) {
    // A private copy: the caller may wipe its array; fast-crypto caches per key object.
    this.sk = new Uint8Array(opts.sk);
    this.pubkey = opts.pubkey;
    this.size = Math.max(1, Math.floor(opts.size ?? os.availableParallelism() - 1));
    this.minBacklog = Math.max(0, opts.minBacklog ?? 16);
    this.idleMs = opts.idleMs ?? 60_000;
    this.log = opts.logger;
  }

  /** Authenticate and decrypt one event, as `openDm` does; settles once, never rejects. */
  open(event: NostrEvent): Promise<OpenResult> {
    return new Promise<OpenResult>((resolve) => {
      this.counts.pending++;
      const job: Job = { id: this.nextId++, event, resolve: (r) => this.settle(resolve, r) };
      if (this.closed || this.workersBroken || !this.flood) {
        this.toMain(job);
        if (!this.closed && !this.workersBroken && this.mainQueue.length > this.minBacklog) this.startFlood();
      } else {
        this.workerQueue.push(job);
        this.pump();
      }
    });
  }

  stats(): UnwrapPoolStats {
    return { workers: this.slots.length, ...this.counts };
  }

  /**
   * Stop taking work to workers, let every accepted event settle, then end the
   * workers. Events opened after close() are opened on the main thread.
   */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.idleTimer);
    while (this.counts.pending > 0) await new Promise<void>((r) => this.settleWaiters.add(r));
    await Promise.all(this.slots.map((s) => this.retire(s)));
  }

  /**
   * Test hook: make one worker die the way a crash would (no retirement mark),
   * dropping the events posted to it and not yet answered. Resolves once it is gone.
   */
  async crashOneWorkerForTest(): Promise<boolean> {
    const slot = this.slots.find((s) => s.inflight.size > 0) ?? this.slots[0];
    if (!slot) return false;
    const gone = new Promise((r) => slot.worker.once('exit', r));
    Atomics.store(slot.control, 0, 1);
    slot.worker.postMessage({ type: 'ping' } satisfies UnwrapRequest);
    await gone;
    return true;
  }

  // --- main thread ---------------------------------------------------------------

  private toMain(job: Job, front = false): void {
    if (front) this.mainQueue.unshift(job);
    else this.mainQueue.push(job);
    if (this.mainScheduled) return;
    this.mainScheduled = true;
    setImmediate(() => this.mainTurn());
  }

  /** One event per turn: whatever else waits on the event loop runs between two unwraps. */
  private mainTurn(): void {
    this.mainScheduled = false;
    const job = this.mainQueue.shift();
    if (!job) return;
    if (this.mainQueue.length > 0) {
      this.mainScheduled = true;
      setImmediate(() => this.mainTurn());
    }
    this.counts.openedOnMain++;
    job.resolve(openDm(job.event, this.sk, this.pubkey));
  }

  private settle(resolve: (r: OpenResult) => void, r: OpenResult): void {
    this.counts.pending--;
    resolve(r);
    if (this.counts.pending === 0) {
      for (const w of [...this.settleWaiters]) w();
      this.settleWaiters.clear();
    }
  }

  // --- workers -------------------------------------------------------------------

  private startFlood(): void {
    this.flood = true;
    // Waiting events move to the workers; the one the main thread may be opening right now stays there.
    const stay = this.mainQueue.filter((j) => j.retry);
    this.workerQueue.push(...this.mainQueue.filter((j) => !j.retry));
    this.mainQueue.splice(0, this.mainQueue.length, ...stay);
    // A worker still retiring from the last flood does not count: it takes no more work.
    while (this.slots.filter((sl) => !sl.retiring).length < this.size) this.spawn();
    this.pump();
  }

  private spawn(): void {
    const start = workerStart();
    const control = new Int32Array(new SharedArrayBuffer(4));
    const data: UnwrapWorkerData = { sk: this.sk, pubkey: this.pubkey, control };
    const worker = new Worker(start.entry, { workerData: data, eval: start.eval });
    const slot: Slot = { worker, control, inflight: new Map(), answered: 0, retiring: false };
    this.slots.push(slot);
    this.counts.workersStarted++;
    worker.on('message', (msg: { id: number; result: OpenResult }) => this.onAnswer(slot, msg));
    worker.on('error', (err) => {
      this.log?.warn({ err: err.message }, 'unwrap worker failed');
    });
    worker.on('exit', (code) => this.onExit(slot, code));
  }

  private onAnswer(slot: Slot, msg: { id: number; result: OpenResult }): void {
    const job = slot.inflight.get(msg.id);
    if (!job) return;
    slot.inflight.delete(msg.id);
    slot.answered++;
    this.failedStarts = 0;
    this.counts.openedInWorkers++;
    job.resolve(msg.result);
    this.pump();
  }

  private onExit(slot: Slot, code: number): void {
    const at = this.slots.indexOf(slot);
    if (at >= 0) this.slots.splice(at, 1);
    // Whatever it held is opened once more, on the main thread, ahead of newer work
    // (a worker retired by the pool holds nothing, unless it was given up on).
    const held = [...slot.inflight.values()].reverse();
    slot.inflight.clear();
    for (const job of held) {
      this.counts.retriedOnMain++;
      job.retry = true;
      this.toMain(job, true);
    }
    if (slot.retiring) return;
    this.counts.crashes++;
    this.log?.warn({ code, inflight: held.length }, 'unwrap worker died; its events are opened on the main thread');
    if (slot.answered === 0 && ++this.failedStarts >= MAX_FAILED_STARTS) {
      this.workersBroken = true;
      this.flood = false;
      this.log?.error('unwrap workers keep dying before answering; opening every event on the main thread');
      for (const s of [...this.slots]) void this.retire(s);
      for (const job of this.workerQueue.splice(0)) this.toMain(job);
      return;
    }
    if (this.flood && !this.closed) this.spawn();
    else if (this.slots.length === 0) for (const job of this.workerQueue.splice(0)) this.toMain(job);
    this.pump();
  }

  /** Hand waiting events to the least busy workers; arm the idle timer when nothing is left. */
  private pump(): void {
    for (;;) {
      const job = this.workerQueue[0];
      if (!job) break;
      let best: Slot | undefined;
      for (const s of this.slots) if (!s.retiring && (!best || s.inflight.size < best.inflight.size)) best = s;
      if (!best || best.inflight.size >= PER_WORKER_INFLIGHT) break;
      this.workerQueue.shift();
      // A worker gets a copy, which fast-crypto's per-object record does not know: say what was checked here.
      const req: UnwrapRequest = { type: 'open', id: job.id, event: job.event, signatureChecked: wasVerified(job.event) };
      try {
        best.worker.postMessage(req);
      } catch (err) {
        // Structured clone can throw (e.g. RangeError on a deeply nested
        // value). Events from the relay pool hold signed fields only, so this
        // is a bug elsewhere; the event is still opened, here, and nothing
        // throws past this loop.
        this.log?.error({ err: (err as Error).message }, 'could not hand an event to an unwrap worker; opening it on the main thread');
        job.retry = true;
        this.toMain(job);
        continue;
      }
      best.inflight.set(job.id, job);
    }
    const busy = this.workerQueue.length > 0 || this.slots.some((s) => s.inflight.size > 0);
    clearTimeout(this.idleTimer);
    this.idleTimer = undefined;
    if (!busy && this.flood && !this.closed) {
      this.idleTimer = setTimeout(() => this.endFlood(), this.idleMs);
      this.idleTimer.unref();
    }
  }

  private endFlood(): void {
    this.flood = false;
    for (const s of [...this.slots]) void this.retire(s);
  }

  /**
   * Ask a worker to end itself after the events already posted to it; only one
   * that has not gone after RETIRE_GRACE_MS is terminated from outside.
   */
  private async retire(slot: Slot): Promise<void> {
    if (slot.retiring) return;
    slot.retiring = true;
    const gone = new Promise<void>((r) => slot.worker.once('exit', () => r()));
    slot.worker.postMessage({ type: 'exit' } satisfies UnwrapRequest);
    const timer = setTimeout(() => void slot.worker.terminate(), RETIRE_GRACE_MS);
    await gone;
    clearTimeout(timer);
  }
}
