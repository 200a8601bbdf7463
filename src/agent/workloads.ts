/**
 * The one owner of a workload's life, from the spawn that acquires it to the
 * teardown that frees it; docs/lifecycle.md draws the states:
 *
 *   spawning → booting → ready → stopping → gone | lost | expired
 *                  └→ failing → stopping → boot_failed
 *
 * It holds the live side of the leases (each workload's phase), the spawn
 * journal (begun and ended in `spawn`, around the answer), the readiness
 * watch, the one shared teardown, expiry and loss (`supervise`, which the
 * supervisor's timer calls), and what a restart decides about what the last
 * run left (`reconcile`). The agent asks it to spawn, stop, extend and
 * inspect; it never calls the agent. It knows drivers, leases and the payment
 * flow's steps; replies it sends go through `Outbox`.
 *
 * Over the house's ~350 lines because the boot-failure refund, the restart
 * decisions and expiry all read and change the same phases: split, each part
 * would need the others' private state.
 */
import type { ComputeDriver, WorkloadHandle, WorkloadSpec } from '../drivers/types.js';
import type { ErrorCode } from '../protocol/errors.js';
import type { IsolationLevel } from '../protocol/isolation.js';
import {
  accessDetailsReply,
  bootFailedNotice,
  errorReply,
  readyNotice,
  toppedUpReply,
  withPayment,
  workloadNotice,
  type Reply,
} from '../protocol/replies.js';
import { toUpstreamReply, type Dialect } from '../protocol/upstream.js';
import { KeyedTurns } from '../util/keyed-turns.js';
import { addLogContext, type Logger } from '../util/logger.js';
import { Jobs } from '../util/jobs.js';
import type { InflightJournal } from './inflight.js';
import { secondsLeft, type Lease, type LeaseStore } from './leases.js';
import type { Outbox, Route } from './outbox.js';
import type { PaymentFlow, Settlement } from './payment-flow.js';
import type { PaymentRecord } from './payment-journal.js';
import type { Plan, Resources } from './plans.js';
import type { PoolClaim, WarmPool } from './warm-pool.js';

/**
 * Where a live workload is in its life. `failing`: its boot failed and what
 * its lease holds is being journaled for refund, before its teardown begins.
 * Ended workloads have no phase (their lease is gone too).
 */
export type Phase = 'spawning' | 'booting' | 'ready' | 'failing' | 'stopping';

export interface WorkloadsOptions {
  drivers: Readonly<Record<string, ComputeDriver>>;
  leases: LeaseStore;
  inflight: InflightJournal;
  outbox: Outbox;
  logger: Logger;
  publicHost: string;
  /** How long a guest may take to become ready before it is deleted with `boot_failed`. */
  readyTimeoutMs: number;
  /** Warn the owner this long before the lease ends. */
  warnBeforeSeconds: number;
  /** The plans on offer now (they change on reload): upstream-shaped replies describe them. */
  plans: () => readonly Plan[];
  payment?: PaymentFlow;
  /** Idle VMs to hand to spawns of their plan; none = every spawn boots cold. */
  warmPool?: WarmPool;
}

/** Everything a spawn needs once the agent has admitted (and charged for) it. */
export interface SpawnOrder {
  requestId: string;
  owner: string;
  channel: string;
  dialect: Dialect;
  workloadId: string;
  driver: string;
  isolationLevel: IsolationLevel;
  resources: Resources;
  leaseSeconds: number;
  /** What the lease holds of the owner's money (given back in full if the guest never boots). */
  paid?: Lease['paid'];
  rootPassword: string;
  sshKeys: string[];
  /** The pool VM this spawn took (its id is `workloadId`), handed off before any other is tried. */
  claim?: PoolClaim;
}

export type SpawnOutcome = { ok: true; lease: Lease } | { ok: false; error: unknown };

/** A VM obtained for a tenant, and whether it already takes their login (no boot to watch). */
interface Acquired {
  handle: WorkloadHandle;
  ready: boolean;
}

export class Workloads {
  private readonly phases = new Map<string, Phase>();
  /** Teardowns under way: a second stop of a workload waits for the first. */
  private readonly teardowns = new Map<string, Promise<void>>();
  /**
   * Lease extensions under way, one workload's at a time: each one's cap is
   * computed from the lease the one before left, and a failed boot reads what
   * the lease holds only after the one paying now has finished.
   */
  private readonly extensions = new KeyedTurns();
  /** The expiry each workload was warned about: a top-up moves the expiry, and so re-arms the warning. */
  private readonly warnedFor = new Map<string, string>();
  private readonly jobs: Jobs;
  /** Workloads whose readiness watch is waiting on the driver: a failed teardown gives them back to it. */
  private readonly watching = new Set<string>();
  /** Aborted at shutdown: readiness watches end without judging the VM (the next run re-adopts it). */
  private readonly shutdown = new AbortController();
  private readonly log: Logger;

  constructor(private readonly opts: WorkloadsOptions) {
    this.log = opts.logger.child({ part: 'workloads' });
    this.jobs = new Jobs((err: unknown) => this.log.error({ err: err instanceof Error ? err.message : String(err) }, 'background task failed'));
  }

  phase(workloadId: string): Phase | undefined {
    return this.phases.get(workloadId);
  }

  /** True while a stop of this workload is under way, or its failed boot is being refunded before one: it takes no more time. */
  isEnding(workloadId: string): boolean {
    const phase = this.phases.get(workloadId);
    return phase === 'failing' || phase === 'stopping';
  }

  /** Whether a driver of this name runs here (checked before anything is reserved or charged). */
  runs(driver: string): boolean {
    return this.opts.drivers[driver] !== undefined;
  }

  /**
   * Journal the spawn, acquire the VM, write its lease, and hand the outcome
   * to `answer`; the journal entry ends once `answer` has returned (the reply
   * is in the outbox), so a crash before that is answered at the next start.
   * The readiness watch starts after the answer.
   */
  async spawn(order: SpawnOrder, answer: (outcome: SpawnOutcome) => Promise<void>): Promise<void> {
    let workloadId = order.workloadId;
    let log = this.log.child({ workloadId });
    addLogContext({ workloadId });
    const started = Date.now();
    let outcome: SpawnOutcome;
    let driver: ComputeDriver | undefined;
    let readyAtOnce = false;
    this.phases.set(workloadId, 'spawning');
    try {
      driver = this.opts.drivers[order.driver];
      if (!driver) throw new Error(`driver ${order.driver} is not running`);
      const journal = (id: string): Promise<void> =>
        this.opts.inflight.begin({ requestId: order.requestId, sender: order.owner, channel: order.channel, workloadId: id, driver: order.driver, startedAt: new Date(started).toISOString() });
      const { resources } = order;
      const spec = { id: workloadId, hostname: workloadId, vcpus: resources.vcpus, memoryMb: resources.memoryMb, diskGb: resources.diskGb, rootPassword: order.rootPassword, sshKeys: order.sshKeys };
      const acquired = await this.acquire(driver, spec, journal, order, log);
      if (acquired.handle.id !== workloadId) {
        this.phases.delete(workloadId);
        workloadId = acquired.handle.id;
        this.phases.set(workloadId, 'spawning');
        log = this.log.child({ workloadId });
        addLogContext({ workloadId });
      }
      readyAtOnce = acquired.ready;
      const createdAt = new Date();
      const lease = leaseOf({ ...order, workloadId }, acquired.handle.sshPort, createdAt, readyAtOnce);
      try {
        await this.opts.leases.put(lease);
      } catch (err) {
        // Without a lease nobody could ever stop it: give the VM back.
        await driver.destroy(workloadId).catch(() => undefined);
        throw err;
      }
      // Booting from the moment the lease exists, not from when the watch
      // starts after the answer: in between, a death is still the watch's to
      // report (boot_failed), not the supervisor's (workload_lost).
      this.phases.set(workloadId, readyAtOnce ? 'ready' : 'booting');
      log.info({ sshPort: acquired.handle.sshPort, tier: order.isolationLevel, pooled: readyAtOnce, ms: Date.now() - started }, 'workload started');
      outcome = { ok: true, lease };
    } catch (error) {
      this.phases.delete(workloadId);
      outcome = { ok: false, error };
    }
    try {
      await answer(outcome);
    } finally {
      await this.opts.inflight.end(order.requestId).catch((err: Error) => log.error({ err: err.message }, 'could not remove the spawn journal entry'));
      // Whatever the answer did: a booting workload nobody watches would never be judged.
      if (outcome.ok && readyAtOnce) await this.notify(outcome.lease, readyNotice(outcome.lease, 0));
      else if (outcome.ok && driver) this.jobs.track(this.watchReady(outcome.lease, driver, log, this.opts.readyTimeoutMs));
    }
  }

  /**
   * The one place a workload is acquired for a tenant. `journal(id)` names
   * the VM in the spawn journal before the host is touched for it (again for
   * each VM tried). With a warm pool, the spawn's claimed idle VM is handed
   * off (it keeps its own id and takes the tenant's login at once: `ready`),
   * then the next idle one, then a cold `create` (warm-pool.ts); without, a
   * cold `create`, which boots.
   */
  private async acquire(driver: ComputeDriver, spec: WorkloadSpec, journal: (id: string) => Promise<void>, order: SpawnOrder, log: Logger): Promise<Acquired> {
    const pool = this.opts.warmPool;
    if (pool) {
      const { handle, pooled } = await pool.acquire(order.claim, driver, spec, order.resources, journal, log);
      return { handle, ready: pooled };
    }
    await journal(spec.id);
    return { handle: await driver.create(spec), ready: false };
  }

  /** Run `extend` as this workload's one lease extension under way. */
  extending<T>(workloadId: string, extend: () => Promise<T>): Promise<T> {
    return this.extensions.run(workloadId, extend);
  }

  /** What the driver sees of the workload now. */
  async inspect(lease: Lease): Promise<'running' | 'gone'> {
    const driver = this.opts.drivers[lease.driver];
    return driver ? (await driver.inspect(lease.workloadId)).state : 'gone';
  }

  /** Tear a workload down and drop its lease; concurrent calls share one teardown. */
  stop(lease: Lease, log: Logger = this.log): Promise<void> {
    const id = lease.workloadId;
    let running = this.teardowns.get(id);
    if (running) return running;
    this.phases.set(id, 'stopping');
    const driver = this.opts.drivers[lease.driver];
    running = (async () => {
      if (driver) await driver.destroy(id);
      await this.opts.leases.delete(id);
      log.info({ workloadId: id }, 'workload stopped');
    })().then(
      () => {
        this.teardowns.delete(id);
        this.phases.delete(id);
        this.warnedFor.delete(id);
      },
      (err: unknown) => {
        this.teardowns.delete(id);
        // Still leased: its owner may stop it again. A boot still watched goes
        // back to its watch (a death is then boot_failed and refunded, as if
        // no stop had been tried); otherwise the supervisor judges it.
        if (this.opts.leases.get(id)) this.phases.set(id, this.watching.has(id) ? 'booting' : 'ready');
        else this.phases.delete(id);
        throw err;
      },
    );
    this.teardowns.set(id, running);
    return running;
  }

  /**
   * One look at every lease (the supervisor's tick): end the expired ones,
   * close those whose process died after boot, warn once before the end.
   */
  async supervise(now = Date.now()): Promise<void> {
    for (const lease of this.opts.leases.all()) {
      const phase = this.phases.get(lease.workloadId);
      if (this.isEnding(lease.workloadId)) continue;
      try {
        const left = secondsLeft(lease, now);
        // A top-up may have moved the expiry since this list was taken.
        if (left <= 0 && secondsLeft(this.opts.leases.get(lease.workloadId) ?? lease, now) <= 0) {
          await this.close(lease, 'expired', 'the lease ended; the workload was stopped and deleted');
          continue;
        }
        // A death during boot is the readiness watch's to report.
        if (phase !== 'booting' && (await this.inspect(lease)) !== 'running') {
          await this.close(lease, 'workload_lost', 'the workload stopped unexpectedly; its resources were freed');
          continue;
        }
        if (left > 0 && left <= this.opts.warnBeforeSeconds && this.warnedFor.get(lease.workloadId) !== lease.expiresAt) {
          // The notice says what is left when it is sent, after this tick's inspections.
          const leftNow = Math.max(1, secondsLeft(lease));
          this.warnedFor.set(lease.workloadId, lease.expiresAt);
          await this.notify(lease, workloadNotice(lease, 'expiring', `the lease ends in ${leftNow} s; the workload will be deleted`, leftNow));
        }
      } catch (err) {
        this.log.error({ workloadId: lease.workloadId, err: (err as Error).message }, 'supervision failed for a lease');
      }
    }
  }

  /**
   * At start, before new requests are taken: settle what a killed run left
   * half-paid, answer spawns it cut short, re-adopt live workloads (resuming
   * their readiness watch), close the leases of dead ones, and remove what no
   * lease claims.
   */
  async reconcile(): Promise<void> {
    const { leases, inflight, drivers } = this.opts;
    // Money first: a paid request is answered with its refund before the spawn journal would answer it without.
    await this.reconcilePayments();

    for (const entry of inflight.leftovers()) {
      const lease = leases.get(entry.workloadId);
      if (lease) {
        // The spawn finished but the agent died before or while replying: answer now.
        this.log.info({ requestId: entry.requestId, workloadId: entry.workloadId }, 'resending access details after restart');
        await this.notify(lease, this.inDialect(lease, accessDetailsReply(lease, this.opts.publicHost), 'spawn'));
      } else {
        await drivers[entry.driver]?.destroy(entry.workloadId).catch((err: Error) =>
          this.log.error({ workloadId: entry.workloadId, err: err.message }, 'could not clean up an interrupted spawn'),
        );
        this.log.warn({ requestId: entry.requestId, workloadId: entry.workloadId }, 'spawn interrupted by a restart; resources released');
        // A paid spawn whose money is not settled yet is answered, with its refund, by the payment journal.
        if (!this.opts.payment?.holds(entry.requestId)) {
          const message = 'the provider restarted during this spawn; nothing was kept; send the request again';
          await this.opts.outbox
            .send({ to: entry.sender, channel: entry.channel, replyTo: entry.requestId }, errorReply(entry.requestId, 'spawn_failed', message))
            .catch(() => undefined);
        }
      }
      await inflight.end(entry.requestId);
    }

    for (const lease of leases.all()) {
      const seen = await drivers[lease.driver]?.inspect(lease.workloadId);
      if (seen?.state !== 'running') {
        await this.close(lease, 'workload_lost', 'the workload stopped while the provider was down; its resources were freed');
        continue;
      }
      this.log.info({ workloadId: lease.workloadId, pid: seen.pid }, 'workload re-adopted');
      if (lease.readyAt) {
        this.phases.set(lease.workloadId, 'ready');
        continue;
      }
      // Its deadline still counts from its creation, with a short grace to look at it at least once.
      this.phases.set(lease.workloadId, 'booting');
      const left = this.opts.readyTimeoutMs - (Date.now() - Date.parse(lease.createdAt));
      this.jobs.track(this.watchReady(lease, drivers[lease.driver]!, this.log.child({ requestId: lease.requestId }), Math.max(left, 15_000)));
    }

    // Whatever the drivers hold that no lease claims was started by an earlier
    // run that died before writing the lease: nobody can reach it, so it goes.
    const known = new Set(leases.all().map((l) => l.workloadId));
    for (const [kind, driver] of Object.entries(drivers)) {
      for (const id of await driver.list()) {
        if (known.has(id)) continue;
        this.log.warn({ driver: kind, workloadId: id }, 'removing a workload without a lease');
        await driver.destroy(id).catch((err: Error) => this.log.error({ workloadId: id, err: err.message }, 'orphan cleanup failed'));
      }
    }
  }

  /** Readiness watches end now, without judging their VM. */
  stopWatching(): void {
    this.shutdown.abort();
  }

  /** End the watches and wait for every background job, also those begun while waiting. */
  async drain(): Promise<void> {
    this.stopWatching();
    await this.jobs.settled();
  }

  /**
   * The access details go out as soon as the VM process exists; this follows
   * up with `ready` once the guest accepts logins, or `boot_failed` (and the
   * VM is deleted, its payment refunded) if it dies or misses the deadline.
   */
  private async watchReady(lease: Lease, driver: ComputeDriver, log: Logger, timeoutMs: number): Promise<void> {
    const id = lease.workloadId;
    if (this.phases.get(id) !== 'booting') return; // stopped before its watch began
    this.watching.add(id);
    const result = await driver.waitReady(id, { timeoutMs, signal: this.shutdown.signal }).finally(() => this.watching.delete(id));
    if (result.ready) {
      if (this.phases.get(id) === 'booting') this.phases.set(id, 'ready');
      log.info({ workloadId: id, ms: result.ms }, 'workload ready');
      await this.notify(lease, readyNotice(lease, result.ms));
      const readyAt = new Date().toISOString();
      await this.opts.leases.update(id, (current) => ({ ...current, readyAt })).catch((err: Error) => log.error({ err: err.message }, 'could not record readiness in the lease'));
      return;
    }
    // Shutting down is not a boot failure: the VM stays, the next run re-adopts it. A stopped one was not lost either.
    if (this.shutdown.signal.aborted || this.phases.get(id) !== 'booting' || !this.opts.leases.get(id)) return;
    log.warn({ workloadId: id, reason: result.reason, ms: result.ms }, 'workload failed to boot');
    const message =
      result.reason === 'died'
        ? 'the VM stopped during boot; it was deleted'
        : `the VM did not become ready within ${Math.round(this.opts.readyTimeoutMs / 1000)} s of its start; it was deleted`;
    // Nothing was delivered: what the lease holds goes back, journaled before the VM (and its lease) goes.
    // Failing first, so no top-up lands after the holding is read; one already paying finishes (or is refunded) before it is.
    this.phases.set(id, 'failing');
    await this.extensions.settled(id);
    const owed = await this.oweForBootFailure(this.opts.leases.get(id) ?? lease, message, log);
    await this.stop(lease, log).catch((err: Error) => log.error({ err: err.message }, 'cleanup after boot failure failed'));
    const money = owed && (await this.opts.payment!.refundOwed(owed));
    const notice = this.bootFailedReply(lease, result.reason, message, result.consoleTail, money);
    if (!notice) return;
    const sent = await this.opts.outbox.send(routeOf(lease), notice).then(
      () => true,
      () => false,
    );
    if (sent && owed && money) await this.opts.payment!.answered(owed.ref, money);
  }

  private async oweForBootFailure(lease: Lease, message: string, log: Logger): Promise<PaymentRecord | undefined> {
    const flow = this.opts.payment;
    if (!lease.paid || lease.paid.msats <= 0 || !flow) return undefined;
    const ctx = { ref: `${lease.requestId}.boot`, kind: 'spawn' as const, sender: lease.owner, channel: lease.channel, dialect: lease.dialect ?? 'v1', workloadId: lease.workloadId };
    return flow.owe(ctx, lease.paid, { code: 'boot_failed', message: `${message}; your payment is refunded` }).catch((err: Error) => {
      log.error({ err: err.message }, 'could not journal the refund of a failed boot');
      return undefined;
    });
  }

  /**
   * The `boot_failed` follow-up, with the refund when the workload was paid.
   * Upstream clients get no unprompted notice, except one carrying their
   * money back, in their error shape.
   */
  private bootFailedReply(
    lease: Pick<Lease, 'requestId' | 'workloadId' | 'dialect'>,
    reason: 'died' | 'timeout',
    message: string,
    consoleTail: string,
    money?: Settlement,
  ): Reply | undefined {
    if (lease.dialect !== 'upstream') return bootFailedNotice(lease, reason, message, consoleTail, money);
    if (!money) return undefined;
    return this.inDialect(lease, withPayment(errorReply(lease.requestId, 'spawn_failed', message), money), 'spawn');
  }

  /**
   * Settle what a killed run left half-paid, and answer those consumers (a
   * spawn's access details or its failure, a top-up's extension, with any refund).
   */
  private async reconcilePayments(): Promise<void> {
    const flow = this.opts.payment;
    if (!flow) return;
    const { leases } = this.opts;
    await flow.reconcile(
      (record) => {
        const lease = this.leaseOfPayment(record);
        if (!lease) return false;
        return record.kind === 'spawn' ? lease.requestId === record.ref : (lease.paidRefs ?? []).includes(record.ref);
      },
      async (record) => {
        // A refund owed for a failed boot, journaled before a crash kept the VM from being deleted:
        // it goes before the money does, or the next step would re-adopt it and serve it for free.
        if (record.failure?.code !== 'boot_failed') return;
        const lease = leases.get(record.workloadId);
        if (lease && `${lease.requestId}.boot` === record.ref) await this.stop(lease);
      },
      async (record, money) => {
        const route = { to: record.sender, channel: record.channel };
        if (record.failure?.code === 'boot_failed') {
          const requestId = record.ref.replace(/\.boot$/, '');
          const notice = this.bootFailedReply({ requestId, workloadId: record.workloadId, dialect: record.dialect }, 'died', record.failure.message, '', money);
          if (notice) await this.opts.outbox.send({ ...route, replyTo: requestId }, notice);
          return;
        }
        const lease = this.leaseOfPayment(record);
        let reply: Reply;
        if (record.phase === 'leased' && lease) {
          reply =
            record.kind === 'spawn'
              ? withPayment(accessDetailsReply(lease, this.opts.publicHost), money)
              : toppedUpReply(record.ref, lease, record.seconds ?? 0, money);
        } else {
          const failure = record.failure ?? { code: 'spawn_failed', message: 'the request failed' };
          reply = withPayment(errorReply(record.ref, failure.code as ErrorCode, failure.message), money);
        }
        await this.opts.outbox.send({ ...route, replyTo: record.ref }, this.inDialect(record, reply, record.kind));
        // Answered here with the refund: the spawn journal must not answer it again without one.
        if (record.kind === 'spawn') await this.opts.inflight.end(record.ref);
      },
    );
  }

  /** A spawn whose pool VM failed its hand-off ended on another workload than the one its payment names: found by its request. */
  private leaseOfPayment(record: PaymentRecord): Lease | undefined {
    const named = this.opts.leases.get(record.workloadId);
    if (named || record.kind !== 'spawn') return named;
    return this.opts.leases.all().find((l) => l.requestId === record.ref);
  }

  private async close(lease: Lease, type: 'expired' | 'workload_lost', message: string): Promise<void> {
    await this.stop(lease);
    this.log.info({ workloadId: lease.workloadId, reason: type }, 'lease closed');
    await this.notify(lease, workloadNotice(lease, type, message, secondsLeft(lease)));
  }

  /** A notice to a workload's owner; never throws (a notice lost is logged). */
  private async notify(lease: Lease, message: Reply): Promise<void> {
    // Upstream's client takes the first DM it sees for its reply: unprompted notices would be misread.
    if (lease.dialect === 'upstream' && message.type !== 'access_details') return;
    await this.opts.outbox
      .send(routeOf(lease), message)
      .catch((err: Error) => this.log.error({ workloadId: lease.workloadId, err: err.message }, 'notice could not be sent'));
  }

  private inDialect(of: { dialect?: Dialect | undefined }, reply: Reply, kind: 'spawn' | 'topup'): Reply {
    return of.dialect === 'upstream' ? toUpstreamReply(reply, { kind, plans: this.opts.plans() }) : reply;
  }
}

function routeOf(lease: Lease): Route {
  return { to: lease.owner, channel: lease.channel, replyTo: lease.requestId };
}

function leaseOf(order: SpawnOrder, sshPort: number, createdAt: Date, ready: boolean): Lease {
  const { resources } = order;
  return {
    workloadId: order.workloadId,
    owner: order.owner,
    requestId: order.requestId,
    channel: order.channel,
    isolationLevel: order.isolationLevel,
    driver: order.driver,
    planId: resources.plan.id,
    planName: resources.plan.name,
    vcpus: resources.vcpus,
    memoryMb: resources.memoryMb,
    diskGb: resources.diskGb,
    sshPort,
    createdAt: createdAt.toISOString(),
    expiresAt: new Date(createdAt.getTime() + order.leaseSeconds * 1000).toISOString(),
    ...(order.dialect === 'upstream' ? { dialect: order.dialect } : {}),
    ...(order.paid ? { paid: order.paid } : {}),
    ...(ready ? { readyAt: createdAt.toISOString() } : {}),
  };
}
