/**
 * The warm pool: per plan, `warmPool` idle VMs booted ahead of demand, so a
 * spawn can take one and hand it to its tenant (password hash, keys,
 * hostname) in about a second instead of waiting for a whole boot.
 *
 * - Refill runs in the background, one VM at a time, and never while a
 *   tenant's spawn is being set up; a VM that fails to boot, dies while idle
 *   or fails its hand-off is destroyed and its plan waits (exponential
 *   backoff) before the next try.
 * - Pool VMs count against the host's limits like leased ones (`holdings`,
 *   fed to admission's `live()`). A spawn takes its VM out of the pool before
 *   it reserves, so the VM is counted once: by the pool, then the spawn's
 *   reservation, then its lease. A spawn that finds no room has idle VMs
 *   given up for it (`evictIdle`): the pool only ever uses room nobody asks for.
 * - `take` gives a VM to one caller only; a VM whose hand-off began never
 *   returns to the pool, whatever happens to the hand-off.
 * - Nothing about the pool is kept on disk: after a restart, every VM the
 *   drivers hold without a lease is destroyed (the supervisor's sweep) and the
 *   pool boots afresh. Re-adopting would save the boots, but would have to
 *   trust the state of a VM nobody watched while the agent was down.
 *
 * The decisions (`poolStep`, `backoffMs`) are pure, in pool-plan.ts; the
 * class holds the VMs, a timer and the driver calls. It is longer than the
 * house's ~350 lines on purpose: boot, claim, hand-off and eviction all move
 * the same VMs between the same states, and one module keeps every move of
 * that state machine in sight.
 */
import { randomBytes } from 'node:crypto';
import type { ComputeDriver, TenantSpec, WarmPoolSupport, WorkloadHandle, WorkloadSpec } from '../drivers/types.js';
import { DriverError } from '../drivers/types.js';
import { RequestError } from '../protocol/errors.js';
import { Jobs } from '../util/jobs.js';
import type { Logger } from '../util/logger.js';
import type { Holding, SpawnAdmission } from './admission.js';
import type { Plan, Resources } from './plans.js';
import { backoffMs, poolStep, sameSize, type PoolVm } from './pool-plan.js';

/** The owner pool VMs have in admission's count: no sender key looks like it, so no sender's quota includes them. */
export const POOL_OWNER = 'warm-pool';

/** A pool VM taken for one spawn. Until its hand-off begins it can go back to the pool untouched. */
export interface PoolClaim {
  readonly id: string;
  /** Back to the pool (the spawn ended before the hand-off); a no-op once the hand-off began. */
  release(): void;
}

export interface WarmPoolStats {
  /** Idle VMs the plans ask for in total. */
  target: number;
  /** Idle VMs ready for a hand-off. */
  ready: number;
  booting: number;
  /** Taken by a spawn that has not begun the hand-off yet. */
  claimed: number;
  handedOff: number;
  handOffFailed: number;
  bootFailed: number;
  /** Idle VMs given up to make room for a tenant's spawn. */
  evicted: number;
}

export interface WarmPoolOptions {
  /** The driver's name as tiers name it: only spawns on that driver take from the pool. */
  driverName: string;
  driver: ComputeDriver;
  plans: readonly Plan[];
  /** The host's limits: a pool VM is booted only when a spawn of its size would be admitted. */
  admission?: SpawnAdmission;
  logger: Logger;
  /** How long a pool VM may take to become ready for a hand-off. */
  idleTimeoutMs: number;
  /** How long a hand-off may take before the VM is given up. */
  handOffTimeoutMs: number;
  /** How often idle VMs are checked and the pool topped up. */
  tickMs?: number;
  backoff?: { baseMs: number; maxMs: number };
}

const DEFAULT_TICK_MS = 2_000;
const DEFAULT_BACKOFF = { baseMs: 5_000, maxMs: 600_000 };
/** Pool VMs one spawn may try to hand off: a third failure in a row says more about the host than the VM, and each try costs a VM and the consumer's wait. */
const MAX_HANDOFFS_PER_SPAWN = 2;
/** A driver that ignores its own hand-off deadline is given up this much later. */
const HANG_GRACE_MS = 1_000;

interface ClaimState {
  vm: PoolVm;
  open: boolean;
}

export class WarmPool {
  private readonly vms = new Map<string, PoolVm & { handle?: WorkloadHandle }>();
  /** Per booting VM: aborts its readiness wait when it is given up for a tenant. */
  private readonly bootAborts = new Map<string, AbortController>();
  private readonly claims = new WeakMap<PoolClaim, ClaimState>();
  private readonly failures = new Map<string, number>();
  private readonly blockedUntil = new Map<string, number>();
  /** Destroys under way in the background; close waits for them. */
  private readonly destroying = new Jobs(() => undefined);
  private readonly counts = { handedOff: 0, handOffFailed: 0, bootFailed: 0, evicted: 0 };
  private readonly warm: WarmPoolSupport;
  private readonly log: Logger;
  private readonly stopping = new AbortController();
  private plans: readonly Plan[];
  private timer: NodeJS.Timeout | undefined;
  private working: Promise<void> | undefined;
  private again = false;
  private booting: Promise<void> | undefined;
  private closed = false;

  constructor(private readonly opts: WarmPoolOptions) {
    if (!opts.driver.warm) throw new Error(`driver ${opts.driverName} cannot keep warm VMs`);
    this.warm = opts.driver.warm;
    this.plans = opts.plans;
    this.log = opts.logger;
  }

  /** Begin topping up. Call after the start's reconciliation removed the previous run's VMs. */
  start(): void {
    if (this.closed || this.timer) return;
    this.timer = setInterval(() => this.kick(), this.opts.tickMs ?? DEFAULT_TICK_MS);
    this.timer.unref();
    this.kick();
  }

  /** New plans (config reload): the pool grows, shrinks or is rebuilt for changed sizes. */
  setPlans(plans: readonly Plan[]): void {
    this.plans = plans;
    this.kick();
  }

  /**
   * An idle VM of exactly the request's size for the plan, for this caller
   * only; undefined when the request is smaller than its plan, is for another
   * driver, or none is idle. Synchronous: two spawns in the same turn cannot
   * get the same VM.
   */
  take(driverName: string, resources: Resources): PoolClaim | undefined {
    if (this.closed || driverName !== this.opts.driverName || !sameSize(resources, resources.plan)) return undefined;
    const vm = [...this.vms.values()].find((v) => v.state === 'idle' && v.planId === resources.plan.id && sameSize(v, resources));
    if (!vm) return undefined;
    vm.state = 'claimed';
    const state: ClaimState = { vm, open: true };
    const claim: PoolClaim = {
      id: vm.id,
      release: () => {
        if (!state.open) return;
        state.open = false;
        if (this.vms.get(vm.id) === vm && vm.state === 'claimed') vm.state = 'idle';
        this.kick();
      },
    };
    this.claims.set(claim, state);
    return claim;
  }

  /** Throws `busy` when the request is one the pool serves and its plan refuses cold spawns while the pool is empty. */
  refuseWhenEmpty(driverName: string, resources: Resources): void {
    const plan = resources.plan;
    if (driverName !== this.opts.driverName || !sameSize(resources, plan) || !(plan.warmPool ?? 0) || plan.whenPoolEmpty !== 'busy') return;
    throw new RequestError('busy', 'no instant VM of this plan is free right now; retry in a few seconds');
  }

  /**
   * The workload for a spawn: the claimed VM handed to the tenant; if its
   * hand-off fails or hangs, it is destroyed and the next idle one tried (at
   * most `MAX_HANDOFFS_PER_SPAWN` in all); then a cold `create` (or `busy`,
   * as the plan says). `journal(id)` runs
   * before the host is touched for `id` (the spawn journal), and again for
   * each next try.
   */
  async acquire(
    claim: PoolClaim | undefined,
    driver: ComputeDriver,
    spec: WorkloadSpec,
    resources: Resources,
    journal: (workloadId: string) => Promise<void>,
    log: Logger,
  ): Promise<{ handle: WorkloadHandle; pooled: boolean }> {
    let next = claim;
    let tried = 0;
    while (next) {
      try {
        await journal(next.id);
      } catch (err) {
        // Taken but not begun: back to the pool, or it would stay claimed (and uncounted) for good.
        next.release();
        throw err;
      }
      const vm = this.begin(next);
      if (vm?.handle) {
        tried++;
        const started = Date.now();
        try {
          await this.handOff(vm.id, { hostname: vm.id, rootPassword: spec.rootPassword, sshKeys: spec.sshKeys });
          this.counts.handedOff++;
          // The driver logs the `handoff` phase itself; this line says which plan and spawn it served.
          log.info({ workloadId: vm.id, plan: vm.planId, ms: Date.now() - started }, 'pool VM handed off');
          return { handle: vm.handle, pooled: true };
        } catch (err) {
          this.counts.handOffFailed++;
          log.warn({ workloadId: vm.id, ms: Date.now() - started, err: (err as Error).message }, 'hand-off failed; the VM is destroyed');
          this.noteFailure(vm.planId);
          await this.destroy(vm.id, log);
        }
      }
      next = tried < MAX_HANDOFFS_PER_SPAWN ? this.take(this.opts.driverName, resources) : undefined;
    }
    if (tried > 0 && resources.plan.whenPoolEmpty === 'busy') {
      throw new RequestError('busy', 'no instant VM of this plan could be handed over right now; retry in a few seconds');
    }
    await journal(spec.id);
    return { handle: await driver.create(spec), pooled: false };
  }

  /**
   * Give up one pool VM nobody has taken (a booting one first: it serves
   * no one yet) so a tenant's spawn gets its room (admission's `evictIdle`):
   * it leaves the count at once and is destroyed in the background (a booting
   * one once its create has returned, by `boot`). Not a failure, so no
   * backoff: the tenant's reservation, then lease, holds the room, and the
   * pool boots again only into room left over. False when there is none.
   */
  evictIdle(): boolean {
    const vms = [...this.vms.values()].reverse();
    const vm = vms.find((v) => v.state === 'booting') ?? vms.find((v) => v.state === 'idle');
    if (!vm) return false;
    this.vms.delete(vm.id);
    this.counts.evicted++;
    this.log.info({ workloadId: vm.id, plan: vm.planId, was: vm.state }, 'pool VM given up to make room for a tenant');
    if (vm.state === 'booting') this.bootAborts.get(vm.id)?.abort();
    else this.destroyLater(vm.id);
    return true;
  }

  /** What pool VMs hold, for admission and discovery (claimed ones are counted by their spawn's reservation). */
  holdings(): Array<Holding & { diskGb: number }> {
    return [...this.vms.values()]
      .filter((vm) => vm.state !== 'claimed')
      .map((vm) => ({ workloadId: vm.id, owner: POOL_OWNER, vcpus: vm.vcpus, memoryMb: vm.memoryMb, diskGb: vm.diskGb, evictable: true }));
  }

  stats(): WarmPoolStats {
    const vms = [...this.vms.values()];
    return {
      target: this.plans.reduce((n, p) => n + (p.warmPool ?? 0), 0),
      ready: vms.filter((v) => v.state === 'idle').length,
      booting: vms.filter((v) => v.state === 'booting').length,
      claimed: vms.filter((v) => v.state === 'claimed').length,
      ...this.counts,
    };
  }

  /** Ids of the VMs the pool holds now (any state). */
  ids(): string[] {
    return [...this.vms.keys()];
  }

  /** Clean shutdown, after the agent drained: stop topping up and destroy every pool VM (they belong to no one). */
  async close(): Promise<void> {
    this.halt();
    await this.working;
    await this.booting;
    const ids = [...this.vms.keys()];
    this.vms.clear();
    await Promise.all(ids.map((id) => this.destroy(id, this.log)));
    await this.destroying.settled();
    if (ids.length) this.log.info({ destroyed: ids.length }, 'pool VMs destroyed at shutdown');
  }

  /** Stop every timer and watch, leaving the VMs as they are (what a crash leaves; for tests of restarts). */
  halt(): void {
    this.closed = true;
    clearInterval(this.timer);
    this.stopping.abort();
  }

  private kick(): void {
    if (this.closed) return;
    if (this.working) {
      this.again = true;
      return;
    }
    this.working = this.step()
      .catch((err: unknown) => this.log.error({ err: (err as Error).message }, 'warm pool step failed'))
      .finally(() => {
        this.working = undefined;
        if (this.again) {
          this.again = false;
          this.kick();
        }
      });
  }

  private async step(): Promise<void> {
    for (const vm of [...this.vms.values()]) {
      if (vm.state !== 'idle') continue;
      const seen = await this.opts.driver.inspect(vm.id).catch(() => undefined);
      if (seen?.state === 'gone' && this.vms.get(vm.id) === vm && vm.state === 'idle') {
        this.vms.delete(vm.id);
        this.log.warn({ workloadId: vm.id, plan: vm.planId }, 'pool VM died while idle; replaced');
        this.noteFailure(vm.planId);
        this.destroyLater(vm.id);
      }
    }
    if (this.closed) return;
    const next = poolStep(this.plans, [...this.vms.values()], this.blockedUntil, Date.now());
    for (const id of next.surplus) {
      this.vms.delete(id);
      this.log.info({ workloadId: id }, 'pool VM no longer wanted; destroyed');
      this.destroyLater(id);
    }
    // Tenants first: a pool boot never competes with a spawn being set up.
    if (!next.boot || this.booting || (this.opts.admission?.inFlight ?? 0) > 0) return;
    const plan = next.boot;
    const size = { vcpus: plan.vcpus, memoryMb: plan.memoryMb, diskGb: plan.diskGb };
    const refusal = this.opts.admission?.roomFor(size);
    if (refusal) {
      this.log.debug({ plan: plan.id, why: refusal.message }, 'pool not topped up: no room');
      return;
    }
    // Counted (holdings) from this turn on, like a reservation.
    const vm: PoolVm & { handle?: WorkloadHandle } = { id: `w-${randomBytes(6).toString('hex')}`, planId: plan.id, ...size, state: 'booting' };
    this.vms.set(vm.id, vm);
    this.booting = this.boot(vm).finally(() => {
      this.booting = undefined;
      this.kick();
    });
  }

  private async boot(vm: PoolVm & { handle?: WorkloadHandle }): Promise<void> {
    const abort = new AbortController();
    this.bootAborts.set(vm.id, abort);
    try {
      await this.bootWatched(vm, abort.signal);
    } finally {
      this.bootAborts.delete(vm.id);
    }
  }

  private async bootWatched(vm: PoolVm & { handle?: WorkloadHandle }, evicted: AbortSignal): Promise<void> {
    const started = Date.now();
    const gone = (why: string, err?: unknown): void => {
      this.vms.delete(vm.id);
      this.counts.bootFailed++;
      this.noteFailure(vm.planId);
      this.log.warn({ workloadId: vm.id, plan: vm.planId, ms: Date.now() - started, err: err instanceof Error ? err.message : undefined }, `pool VM ${why}; destroyed`);
    };
    try {
      vm.handle = await this.warm.createIdle({ id: vm.id, vcpus: vm.vcpus, memoryMb: vm.memoryMb, diskGb: vm.diskGb });
    } catch (err) {
      // createIdle releases what it took on failure; destroy anyway in case it got as far as a process.
      if (!evicted.aborted) gone('could not be created', err);
      this.destroyLater(vm.id);
      return;
    }
    // Given up for a tenant while being created: nobody else destroys it.
    if (evicted.aborted) return this.destroyLater(vm.id);
    this.log.info({ workloadId: vm.id, plan: vm.planId, ms: Date.now() - started }, 'pool VM booting');
    let result: Awaited<ReturnType<WarmPoolSupport['waitIdle']>>;
    try {
      result = await this.warm.waitIdle(vm.id, { timeoutMs: this.opts.idleTimeoutMs, signal: AbortSignal.any([this.stopping.signal, evicted]) });
    } catch (err) {
      // A wait that throws (an unreadable vm.json, say) is a boot that failed, never a rejection nobody handles.
      if (!evicted.aborted && !this.closed) gone('could not be watched', err);
      if (!this.closed) this.destroyLater(vm.id);
      return;
    }
    if (evicted.aborted) return this.destroyLater(vm.id);
    // Shutting down (or a crash in tests): close() destroys it, or the next start's sweep does.
    if (this.closed) return;
    if (!result.ready) {
      gone(result.reason === 'died' ? 'died while booting' : 'did not become ready in time');
      this.destroyLater(vm.id);
      return;
    }
    vm.state = 'idle';
    this.failures.delete(vm.planId);
    this.blockedUntil.delete(vm.planId);
    this.log.info({ workloadId: vm.id, plan: vm.planId, ms: Date.now() - started }, 'pool VM ready');
  }

  /** The claim's VM, out of the pool for good; undefined when the claim was released or already used. */
  private begin(claim: PoolClaim): (PoolVm & { handle?: WorkloadHandle }) | undefined {
    const state = this.claims.get(claim);
    if (!state?.open) return undefined;
    state.open = false;
    const vm = this.vms.get(state.vm.id);
    if (vm !== state.vm) return undefined;
    this.vms.delete(vm.id);
    this.kick();
    return vm;
  }

  private async handOff(id: string, tenant: TenantSpec): Promise<void> {
    const timeoutMs = this.opts.handOffTimeoutMs;
    const abort = new AbortController();
    let timer: NodeJS.Timeout | undefined;
    const hung = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        abort.abort();
        reject(new DriverError('handoff_failed', `the hand-off took longer than ${timeoutMs} ms`));
      }, timeoutMs + HANG_GRACE_MS);
    });
    const handing = this.warm.handOff(id, tenant, { timeoutMs, signal: abort.signal });
    // Its outcome no longer matters once the deadline has passed.
    handing.catch(() => undefined);
    try {
      await Promise.race([handing, hung]);
    } finally {
      clearTimeout(timer);
    }
  }

  private noteFailure(planId: string): void {
    const n = (this.failures.get(planId) ?? 0) + 1;
    this.failures.set(planId, n);
    const { baseMs, maxMs } = this.opts.backoff ?? DEFAULT_BACKOFF;
    const wait = backoffMs(n, baseMs, maxMs);
    this.blockedUntil.set(planId, Date.now() + wait);
    this.log.debug({ plan: planId, failures: n, waitMs: wait }, 'pool backs off');
  }

  /** Never rejects: a failure is logged (on the spawn's logger when a spawn tried the VM). */
  private destroy(id: string, log: Logger = this.log): Promise<void> {
    return this.opts.driver.destroy(id).catch((err: Error) => log.error({ workloadId: id, err: err.message }, 'could not destroy a pool VM'));
  }

  private destroyLater(id: string): void {
    void this.destroying.track(this.destroy(id));
  }
}
