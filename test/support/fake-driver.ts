/**
 * An in-memory `ComputeDriver` that keeps the contract of src/drivers/types.ts
 * (ids, ports from a range, idempotent destroy, `waitReady` that ends early on
 * death or abort) with no host resources, so the agent's lifecycle can be
 * tested in-process. A workload here is a record, not a process: the test
 * decides when it becomes ready, dies, or how long a create or a destroy takes.
 *
 * Workloads live in the driver object, not in the agent: give the same driver
 * to a restarted agent and it finds them again, as qemu outlives the service.
 */
import type { ComputeDriver, IdleSpec, ReadyResult, TenantSpec, WarmPoolSupport, WorkloadHandle, WorkloadInspection, WorkloadSpec } from '../../src/drivers/types.js';
import { DriverError } from '../../src/drivers/types.js';
import type { Gate } from './gate.js';

/** How a new workload boots: at once when its readiness is first awaited, only when `markReady` says so, or never. */
export type BootMode = 'ready' | 'manual' | 'never';

export interface FakeWorkload {
  id: string;
  pid: number;
  sshPort: number;
  /** False once the "process" died or was destroyed; a dead workload stays listed until destroyed (like its directory). */
  alive: boolean;
  ready: boolean;
  vcpus: number;
  memoryMb: number;
  /** Made by `warm.createIdle` (a pool VM). */
  idle?: boolean;
  /** The tenant a hand-off gave it to (its hostname). */
  handedTo?: string;
}

/** How one hand-off goes: as asked, refused by the guest, or never answered (a guest agent that hangs, ignoring the deadline). */
export type HandOffOutcome = 'ok' | 'fail' | 'hang';

export interface FakeDriverOptions {
  kind?: string;
  /** Ports handed out, inclusive; when all are taken `create` fails with `capacity`. */
  ports?: { from: number; to: number };
  boot?: BootMode;
}

export class FakeDriver implements ComputeDriver {
  readonly kind: string;
  boot: BootMode;
  readonly workloads = new Map<string, FakeWorkload>();
  /** Every spec `create` was called with, in order (passwords included: memory only, like the real driver). */
  readonly createCalls: WorkloadSpec[] = [];
  /** Every id `destroy` was called with, in order (repeats included). */
  readonly destroyCalls: string[] = [];
  /** The next `create` fails with this after taking its resources (and releasing them, per the contract). */
  failNextCreate: DriverError | undefined;
  /** The next `destroy` fails with this before touching the workload (a host that refuses to let go). */
  failNextDestroy: Error | undefined;
  /** While set, `create` holds after the workload exists and before it returns (a slow pidfile). */
  createGate: Gate | undefined;
  /** While set, `destroy` holds before the workload goes (a guest slow to stop). */
  destroyGate: Gate | undefined;
  closed = false;
  /** How pool VMs boot (`warm.waitIdle`), like `boot` for tenants' VMs. */
  idleBoot: BootMode = 'ready';
  /** Errors the next `warm.waitIdle` calls throw, in order (an unreadable vm.json, say). */
  waitIdleErrors: Error[] = [];
  /** Outcomes of the next hand-offs, in order; `ok` once empty. */
  handOffOutcomes: HandOffOutcome[] = [];
  /** Every `warm.createIdle` spec, in order. */
  readonly createIdleCalls: IdleSpec[] = [];
  /** Every `warm.handOff` call, in order (passwords included: memory only). */
  readonly handOffCalls: Array<{ id: string; tenant: TenantSpec }> = [];
  /** Hand-offs asked for a VM already handed to a tenant: must stay 0. */
  secondHandOffs = 0;
  readonly warm: WarmPoolSupport = {
    createIdle: (spec) => this.createIdle(spec),
    waitIdle: async (id, opts) => {
      const err = this.waitIdleErrors.shift();
      if (err) throw err;
      return this.waitFor(id, opts, () => this.idleBoot === 'ready');
    },
    handOff: (id, tenant, opts) => this.handOff(id, tenant, opts),
  };

  private readonly ports: { from: number; to: number };
  private nextPid = 10_000;
  /** Wakes the `waitReady` calls of a workload when its state changes. */
  private readonly watchers = new Map<string, Set<() => void>>();

  constructor(opts: FakeDriverOptions = {}) {
    this.kind = opts.kind ?? 'kvm';
    this.boot = opts.boot ?? 'ready';
    this.ports = opts.ports ?? { from: 40_000, to: 40_099 };
  }

  async create(spec: WorkloadSpec): Promise<WorkloadHandle> {
    this.createCalls.push(spec);
    if (this.workloads.has(spec.id)) throw new DriverError('internal', 'workload id already in use');
    const sshPort = this.freePort();
    if (sshPort === undefined) throw new DriverError('capacity', 'no free port in the range');
    const w: FakeWorkload = { id: spec.id, pid: this.nextPid++, sshPort, alive: true, ready: false, vcpus: spec.vcpus, memoryMb: spec.memoryMb };
    this.workloads.set(spec.id, w);
    try {
      const failure = this.failNextCreate;
      this.failNextCreate = undefined;
      if (failure) throw failure;
      if (this.createGate) await this.createGate.passed;
    } catch (err) {
      // The contract: a failed create leaves nothing behind.
      this.workloads.delete(spec.id);
      throw err;
    }
    return { id: spec.id, pid: w.pid, sshPort, dir: `/fake/${spec.id}` };
  }

  async destroy(id: string): Promise<void> {
    this.destroyCalls.push(id);
    if (this.destroyGate) await this.destroyGate.passed;
    const failure = this.failNextDestroy;
    this.failNextDestroy = undefined;
    if (failure) throw failure;
    const w = this.workloads.get(id);
    if (!w) return;
    w.alive = false;
    this.workloads.delete(id);
    this.wake(id);
  }

  async inspect(id: string): Promise<WorkloadInspection> {
    const w = this.workloads.get(id);
    return w?.alive ? { id, state: 'running', pid: w.pid, sshPort: w.sshPort } : { id, state: 'gone' };
  }

  async list(): Promise<string[]> {
    return [...this.workloads.keys()];
  }

  waitReady(id: string, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<ReadyResult> {
    return this.waitFor(id, opts, () => this.boot === 'ready');
  }

  private async createIdle(spec: IdleSpec): Promise<WorkloadHandle> {
    this.createIdleCalls.push(spec);
    const handle = await this.create({ ...spec, hostname: spec.id, rootPassword: '', sshKeys: [] });
    // Not a tenant's create: only createIdleCalls records it.
    this.createCalls.pop();
    this.mustGet(spec.id).idle = true;
    return handle;
  }

  private async handOff(id: string, tenant: TenantSpec, _opts: { timeoutMs: number; signal?: AbortSignal }): Promise<void> {
    this.handOffCalls.push({ id, tenant });
    const w = this.workloads.get(id);
    if (w?.handedTo !== undefined) {
      this.secondHandOffs++;
      throw new DriverError('handoff_failed', 'this VM already has a tenant');
    }
    if (!w?.alive || !w.idle) throw new DriverError('handoff_failed', 'no idle VM with this id');
    const outcome = this.handOffOutcomes.shift() ?? 'ok';
    if (outcome === 'hang') return new Promise<void>(() => undefined);
    if (outcome === 'fail') throw new DriverError('handoff_failed', 'the guest agent refused the hand-off');
    w.handedTo = tenant.hostname;
    w.idle = false;
    w.ready = true;
  }

  private waitFor(id: string, opts: { timeoutMs: number; signal?: AbortSignal }, bootsAtOnce: () => boolean): Promise<ReadyResult> {
    const t0 = Date.now();
    return new Promise<ReadyResult>((resolve) => {
      let timer: NodeJS.Timeout | undefined;
      const finish = (result: ReadyResult): void => {
        clearTimeout(timer);
        this.watchers.get(id)?.delete(check);
        opts.signal?.removeEventListener('abort', check);
        resolve(result);
      };
      const failed = (reason: 'died' | 'timeout'): ReadyResult => ({ ready: false, reason, ms: Date.now() - t0, consoleTail: `fake console of ${id}` });
      const check = (): void => {
        const w = this.workloads.get(id);
        if (!w?.alive) return finish(failed('died'));
        if (w.ready || bootsAtOnce()) {
          w.ready = true;
          return finish({ ready: true, ms: Date.now() - t0 });
        }
        if (opts.signal?.aborted) return finish(failed('timeout'));
      };
      timer = setTimeout(() => finish(failed('timeout')), opts.timeoutMs);
      let set = this.watchers.get(id);
      if (!set) this.watchers.set(id, (set = new Set()));
      set.add(check);
      opts.signal?.addEventListener('abort', check);
      check();
    });
  }

  close(): void {
    this.closed = true;
  }

  // --- what the test does to the "host" ------------------------------------------

  /** The guest now accepts logins. */
  markReady(id: string): void {
    const w = this.mustGet(id);
    w.ready = true;
    this.wake(id);
  }

  /** The workload's process dies; its remains stay listed until destroyed. */
  kill(id: string): void {
    const w = this.mustGet(id);
    w.alive = false;
    this.wake(id);
  }

  /**
   * A workload the agent did not create in this run: a live one (re-adopted
   * or orphaned) or the remains of a half-made one (`alive: false`).
   */
  plant(id: string, opts: { alive: boolean; ready?: boolean }): FakeWorkload {
    const sshPort = this.freePort();
    if (sshPort === undefined) throw new Error('fake driver: no port left to plant a workload');
    const w: FakeWorkload = { id, pid: this.nextPid++, sshPort, alive: opts.alive, ready: opts.ready ?? false, vcpus: 1, memoryMb: 256 };
    this.workloads.set(id, w);
    return w;
  }

  get(id: string): FakeWorkload | undefined {
    return this.workloads.get(id);
  }

  private mustGet(id: string): FakeWorkload {
    const w = this.workloads.get(id);
    if (!w) throw new Error(`fake driver: no workload ${id}`);
    return w;
  }

  private wake(id: string): void {
    for (const check of [...(this.watchers.get(id) ?? [])]) check();
  }

  private freePort(): number | undefined {
    const taken = new Set([...this.workloads.values()].map((w) => w.sshPort));
    for (let p = this.ports.from; p <= this.ports.to; p++) if (!taken.has(p)) return p;
    return undefined;
  }
}
