/**
 * Keeps the lease table and the host in agreement over time:
 *  - at start, finishes what a previous run left half-done (spawn journal),
 *    re-adopts live workloads and closes the leases of dead ones;
 *  - while running, ends leases at their expiry (with a warning shortly
 *    before) and closes the lease of a workload whose process died.
 * Each closed lease is told to its owner.
 */
import type { ComputeDriver } from '../drivers/types.js';
import { errorReply, type WorkloadNotice } from '../protocol/replies.js';
import type { Logger } from '../util/logger.js';
import { secondsLeft, type Agent, type Outbox } from './agent.js';
import type { InflightJournal } from './inflight.js';
import type { Lease, LeaseStore } from './leases.js';

export interface SupervisorOptions {
  agent: Agent;
  leases: LeaseStore;
  inflight: InflightJournal;
  drivers: Readonly<Record<string, ComputeDriver>>;
  outbox: Outbox;
  logger: Logger;
  /** How often leases are checked for expiry and dead processes. */
  tickMs: number;
  /** Warn the owner this long before the end. */
  warnBeforeSeconds: number;
}

export class Supervisor {
  private timer: NodeJS.Timeout | undefined;
  private ticking: Promise<void> | undefined;
  /** The expiry each workload was warned about: a top-up moves the expiry, and so re-arms the warning. */
  private readonly warnedFor = new Map<string, string>();
  private readonly log: Logger;

  constructor(private readonly opts: SupervisorOptions) {
    this.log = opts.logger.child({ part: 'supervisor' });
  }

  /** Run once at start, before new requests are taken. */
  async reconcile(): Promise<void> {
    const { leases, inflight, drivers, agent } = this.opts;

    for (const entry of inflight.leftovers()) {
      const lease = leases.get(entry.workloadId);
      if (lease) {
        // The spawn finished but the agent died before or while replying: answer now.
        this.log.info({ requestId: entry.requestId, workloadId: entry.workloadId }, 'resending access details after restart');
        await this.send(lease, agent.resentAccessDetails(lease));
      } else {
        await drivers[entry.driver]?.destroy(entry.workloadId).catch((err: Error) =>
          this.log.error({ workloadId: entry.workloadId, err: err.message }, 'could not clean up an interrupted spawn'),
        );
        this.log.warn({ requestId: entry.requestId, workloadId: entry.workloadId }, 'spawn interrupted by a restart; resources released');
        // A paid spawn whose money is not settled yet is answered, with its refund, by the payment journal.
        if (agent.holdsPayment(entry.requestId)) {
          await inflight.end(entry.requestId);
          continue;
        }
        await this.opts.outbox
          .send(
            { to: entry.sender, channel: entry.channel, replyTo: entry.requestId },
            errorReply(entry.requestId, 'spawn_failed', 'the provider restarted during this spawn; nothing was kept; send the request again'),
          )
          .catch(() => undefined);
      }
      await inflight.end(entry.requestId);
    }

    for (const lease of leases.all()) {
      const seen = await drivers[lease.driver]?.inspect(lease.workloadId);
      if (seen?.state === 'running') {
        this.log.info({ workloadId: lease.workloadId, pid: seen.pid }, 'workload re-adopted');
        agent.resumeReadiness(lease);
      } else {
        await this.close(lease, 'workload_lost', 'the workload stopped while the provider was down; its resources were freed');
      }
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

  start(): void {
    this.timer = setInterval(() => {
      this.ticking ??= this.tick().finally(() => (this.ticking = undefined));
    }, this.opts.tickMs);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    clearInterval(this.timer);
    await this.ticking;
  }

  private async tick(): Promise<void> {
    const now = Date.now();
    for (const lease of this.opts.leases.all()) {
      if (this.opts.agent.isStopping(lease.workloadId)) continue;
      try {
        const left = secondsLeft(lease, now);
        // A top-up may have moved the expiry since this list was taken.
        if (left <= 0 && secondsLeft(this.opts.leases.get(lease.workloadId) ?? lease, now) <= 0) {
          await this.close(lease, 'expired', 'the lease ended; the workload was stopped and deleted');
          continue;
        }
        const seen = this.opts.agent.isBooting(lease.workloadId)
          ? undefined // its readiness watch reports a death during boot
          : await this.opts.drivers[lease.driver]?.inspect(lease.workloadId);
        if (seen && seen.state !== 'running') {
          await this.close(lease, 'workload_lost', 'the workload stopped unexpectedly; its resources were freed');
          continue;
        }
        if (left > 0 && left <= this.opts.warnBeforeSeconds && this.warnedFor.get(lease.workloadId) !== lease.expiresAt) {
          this.warnedFor.set(lease.workloadId, lease.expiresAt);
          await this.send(lease, this.notice(lease, 'expiring', `the lease ends in ${left} s; the workload will be deleted`));
        }
      } catch (err) {
        this.log.error({ workloadId: lease.workloadId, err: (err as Error).message }, 'supervision failed for a lease');
      }
    }
  }

  private async close(lease: Lease, type: 'expired' | 'workload_lost', message: string): Promise<void> {
    await this.opts.agent.destroyLease(lease, this.log);
    this.warnedFor.delete(lease.workloadId);
    this.log.info({ workloadId: lease.workloadId, reason: type }, 'lease closed');
    await this.send(lease, this.notice(lease, type, message));
  }

  private notice(lease: Lease, type: WorkloadNotice['type'], message: string): WorkloadNotice {
    return {
      type,
      version: 1,
      request_id: lease.requestId,
      workload_id: lease.workloadId,
      expires_at: lease.expiresAt,
      seconds_left: secondsLeft(lease),
      message,
    };
  }

  private async send(lease: Lease, message: WorkloadNotice | ReturnType<Agent['resentAccessDetails']>): Promise<void> {
    // Upstream's client takes the first DM it sees for its reply: unprompted notices would be misread.
    if (lease.dialect === 'upstream' && message.type !== 'access_details') return;
    await this.opts.outbox
      .send({ to: lease.owner, channel: lease.channel, replyTo: lease.requestId }, message)
      .catch((err: Error) => this.log.error({ workloadId: lease.workloadId, err: err.message }, 'notice could not be sent'));
  }
}
