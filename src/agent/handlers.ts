/**
 * What each request does once it runs: spawn, top-up, stop and status, and
 * the error reply for any failure. The agent decides whether a message runs
 * at all and sends what these return; a workload's life belongs to
 * `Workloads`, the money steps to `PaymentFlow`.
 *
 * The order inside spawn and top-up is the point: every free check before
 * the token is looked at, the lease written before the answer.
 */
import { randomBytes } from 'node:crypto';
import { DriverError } from '../drivers/types.js';
import { RequestError } from '../protocol/errors.js';
import type { SpawnRequest, StatusRequest, StopRequest, TopupRequest } from '../protocol/requests.js';
import type { Dialect } from '../protocol/upstream.js';
import { accessDetailsReply, errorReply, statusReply, stoppedReply, toppedUpReply, withPayment, type ErrorReply, type Reply } from '../protocol/replies.js';
import type { Logger } from '../util/logger.js';
import type { Reservation, SpawnAdmission } from './admission.js';
import type { Allowlist } from './allowlist.js';
import { RefundedError, type PaymentFlow, type Settlement } from './payment-flow.js';
import type { PaymentRecord } from './payment-journal.js';
import { extendedExpiry, topupCapSeconds } from './pricing.js';
import { secondsLeft, type Lease, type LeaseStore } from './leases.js';
import { resolveResources, type Plan } from './plans.js';
import { chooseTier, type TierOffer } from './tiers.js';
import type { SpawnOutcome, Workloads } from './workloads.js';
import type { WarmPool } from './warm-pool.js';

/** What the handlers read; the agent's options, shared, so a reload reaches them from the next request on. */
export interface HandlerOptions {
  publicHost: string;
  tiers: readonly TierOffer[];
  plans: readonly Plan[];
  defaultPlan: string;
  /** Read for ownership; written only by `workloads` and by top-ups. */
  leases: LeaseStore;
  workloads: Workloads;
  /** Workload caps, spawns in flight, committed vCPU/RAM; none = unlimited. */
  admission?: SpawnAdmission;
  /** Who may spawn: anyone (`open`, the default), keys on `allowlist`, or anyone who pays (`paid`, needs `payment`). */
  admissionMode?: 'open' | 'allowlist' | 'paid';
  allowlist?: Allowlist;
  payment?: PaymentFlow;
  /** Idle VMs for spawns of their plan's full size (plans with `warmPool` > 0). */
  warmPool?: WarmPool;
}

/** Who asked, and which request of theirs this is. */
export interface Asker {
  requestId: string;
  /** Authenticated sender key (hex). */
  sender: string;
  channel: string;
}

/** What a paid request leaves for the agent to close once its reply is in the outbox. */
export interface PaidOutcome {
  settlement?: Settlement;
}

export class RequestHandlers {
  constructor(private readonly opts: HandlerOptions) {}

  async spawn(req: SpawnRequest, msg: Asker, log: Logger, dialect: Dialect, paid: PaidOutcome, respond: (reply: Reply) => Promise<void>): Promise<void> {
    if (this.opts.admissionMode === 'allowlist' && !this.opts.allowlist?.has(msg.sender)) {
      throw new RequestError('not_allowed', 'this provider only serves the keys on its allowlist');
    }
    const resources = resolveResources(this.opts.plans, this.opts.defaultPlan, req);
    const minimum = req.isolation ?? 'shared-kernel';
    const tier = chooseTier(this.opts.tiers, minimum);
    if (!tier) {
      throw new RequestError(
        'isolation_unavailable',
        `no offered isolation tier meets ${minimum}; offered: ${this.opts.tiers.map((t) => t.level).join(', ')}`,
      );
    }
    if (!this.opts.workloads.runs(tier.driver)) throw new Error(`tier ${tier.level} names driver ${tier.driver}, which is not running`);
    // A pool VM leaves the pool before the reservation, which then counts it
    // once; it goes back untouched on any way out before its hand-off.
    const claim = this.opts.warmPool?.take(tier.driver, resources);
    // Reserved before anything touches the host; released on every way out
    // (once the spawn's outcome is known its lease, if any, counts instead).
    let reservation: Reservation | undefined;
    // Refused only for the room idle pool VMs hold: they are given up once the spawn is paid, not before.
    let evictOncePaid = false;
    try {
      try {
        reservation = this.opts.admission?.reserve(msg.sender, resources);
      } catch (err) {
        if (!this.opts.admission?.admitsAfterEviction(msg.sender, resources, err)) throw err;
        evictOncePaid = true;
      }
      if (!claim) this.opts.warmPool?.refuseWhenEmpty(tier.driver, resources);
      const workloadId = claim?.id ?? `w-${randomBytes(6).toString('hex')}`;
      // Every free check above has passed: only now is the token looked at, and swapped.
      const payment = await this.chargeForSpawn(req, msg, dialect, resources.plan, workloadId);
      if (evictOncePaid) {
        try {
          reservation = this.opts.admission!.reserve(msg.sender, resources, { evict: true });
        } catch (err) {
          // Another spawn took the room meanwhile: refused, and refunded when paid.
          await respond(await this.spawnReply({ ok: false, error: err }, payment, msg.requestId, log, paid));
          return;
        }
      }
      const order = {
        requestId: msg.requestId,
        owner: msg.sender,
        channel: msg.channel,
        dialect,
        workloadId,
        driver: tier.driver,
        isolationLevel: tier.level,
        resources,
        leaseSeconds: payment ? (payment.seconds ?? 0) : resources.plan.durationSeconds,
        ...(payment ? { paid: { mint: payment.mint, unit: payment.unit, msats: (payment.msats ?? 0) - (payment.refundMsats ?? 0) } } : {}),
        rootPassword: req.root_password,
        sshKeys: req.ssh_keys ?? [],
        ...(claim ? { claim } : {}),
      };
      await this.opts.workloads.spawn(order, async (outcome) => {
        reservation?.release();
        await respond(await this.spawnReply(outcome, payment, msg.requestId, log, paid));
      });
    } finally {
      reservation?.release();
      claim?.release();
    }
  }

  /** The answer to a spawn: its access details or its failure, with the money settled when it was paid. */
  private async spawnReply(outcome: SpawnOutcome, payment: PaymentRecord | undefined, requestId: string, log: Logger, paid: PaidOutcome): Promise<Reply> {
    try {
      if (!payment) return outcome.ok ? accessDetailsReply(outcome.lease, this.opts.publicHost) : this.toErrorReply(outcome.error, requestId, log);
      const flow = this.opts.payment!;
      if (!outcome.ok) {
        const refused = this.toErrorReply(outcome.error, requestId, log);
        paid.settlement = await flow.finish(payment, false, { code: refused.code, message: `${refused.message}; your payment is refunded` });
        return withPayment(refused, paid.settlement);
      }
      paid.settlement = await flow.finish(payment, true);
      return withPayment(accessDetailsReply(outcome.lease, this.opts.publicHost), paid.settlement);
    } catch (err) {
      return this.failureReply(err, requestId, log, paid);
    }
  }

  /**
   * The swap for a paid spawn, or undefined when it is free (open or
   * allowlist mode, or a plan at rate 0: nothing to divide by, nothing taken).
   */
  private async chargeForSpawn(req: SpawnRequest, msg: Asker, dialect: Dialect, plan: Plan, workloadId: string): Promise<PaymentRecord | undefined> {
    const flow = this.opts.payment;
    const rate = plan.rateMsatsPerSec ?? 0;
    if (this.opts.admissionMode !== 'paid' || !flow || rate <= 0) return undefined;
    if (!req.cashu_token) {
      throw new RequestError('payment_required', `plan ${plan.id} costs ${rate} msat/s; send a cashu_token from one of the mints in the offer`);
    }
    const ctx = { ref: msg.requestId, kind: 'spawn' as const, sender: msg.sender, channel: msg.channel, dialect, workloadId };
    return flow.charge(ctx, req.cashu_token, rate, flow.policy.maxLeaseSeconds);
  }

  /**
   * More time for a live workload of one's own: owner, lease and plan are
   * checked before the swap; the lease is extended from its current expiry
   * and written before the reply; a lease gone during the swap gets the whole
   * payment back.
   */
  async topup(req: TopupRequest, msg: Asker, log: Logger, dialect: Dialect, paid: PaidOutcome): Promise<Reply> {
    const flow = this.opts.payment;
    if (this.opts.admissionMode !== 'paid' || !flow) throw new RequestError('payment_required', 'this provider does not sell extensions');
    const { workloadId } = this.ownedLease(req.workload_id, msg.sender);
    return this.opts.workloads.extending(workloadId, () => this.topupInTurn(req, msg, log, dialect, paid, flow));
  }

  private async topupInTurn(req: TopupRequest, msg: Asker, log: Logger, dialect: Dialect, paid: PaidOutcome, flow: PaymentFlow): Promise<Reply> {
    const { workloads } = this.opts;
    const lease = this.ownedLease(req.workload_id, msg.sender);
    if (workloads.isEnding(lease.workloadId) || secondsLeft(lease) <= 0) throw new RequestError('not_found', `no workload ${req.workload_id} for this key`);
    const plan = this.opts.plans.find((p) => p.id === lease.planId);
    if (!plan?.rateMsatsPerSec) throw new RequestError('payment_required', 'this workload\'s plan is free: it cannot be extended');
    const ctx = { ref: msg.requestId, kind: 'topup' as const, sender: msg.sender, channel: msg.channel, dialect, workloadId: lease.workloadId };
    const payment = await flow.charge(ctx, req.cashu_token, plan.rateMsatsPerSec, topupCapSeconds(secondsLeft(lease), flow.policy));
    const seconds = payment.seconds ?? 0;
    const charged = (payment.msats ?? 0) - (payment.refundMsats ?? 0);
    // Applied to the lease as it is when its write comes (a readiness mark may be ahead of it), and not at all once it is gone.
    let extended: Lease | undefined;
    try {
      await this.opts.leases.update(lease.workloadId, (current) => {
        if (workloads.isEnding(current.workloadId) || secondsLeft(current) <= 0) return current;
        extended = {
          ...current,
          expiresAt: extendedExpiry(current.expiresAt, seconds),
          paidRefs: [...(current.paidRefs ?? []).slice(-15), msg.requestId],
          // One mint and unit per lease's holding; a top-up from another mint is not given back on a failed boot.
          ...(!current.paid || (current.paid.mint === payment.mint && current.paid.unit === payment.unit)
            ? { paid: { mint: payment.mint, unit: payment.unit, msats: (current.paid?.msats ?? 0) + charged } }
            : {}),
        };
        return extended;
      });
    } catch (err) {
      paid.settlement = await flow.finish(payment, false, { code: 'internal_error', message: 'the lease could not be extended; your payment is refunded' });
      throw new RefundedError('internal_error', 'the lease could not be extended; your payment is refunded', paid.settlement);
    }
    if (!extended) {
      const message = 'the workload ended while the payment was made; your payment is refunded';
      paid.settlement = await flow.finish(payment, false, { code: 'not_found', message });
      return withPayment(errorReply(msg.requestId, 'not_found', message), paid.settlement);
    }
    log.info({ workloadId: lease.workloadId, seconds, expiresAt: extended.expiresAt }, 'lease extended');
    paid.settlement = await flow.finish(payment, true);
    return toppedUpReply(msg.requestId, extended, seconds, paid.settlement);
  }

  /** The caller's own lease, or `not_found` — the same answer whether it exists for someone else or not at all. */
  private ownedLease(workloadId: string, sender: string): Lease {
    const lease = this.opts.leases.get(workloadId);
    if (!lease || lease.owner !== sender) throw new RequestError('not_found', `no workload ${workloadId} for this key`);
    return lease;
  }

  async stop(req: StopRequest, msg: Asker, log: Logger): Promise<Reply> {
    const lease = this.ownedLease(req.workload_id, msg.sender);
    await this.opts.workloads.stop(lease, log);
    return stoppedReply(msg.requestId, lease.workloadId);
  }

  async status(req: StatusRequest, msg: Asker): Promise<Reply> {
    const lease = this.ownedLease(req.workload_id, msg.sender);
    const state = await this.opts.workloads.inspect(lease);
    return statusReply(msg.requestId, lease, this.opts.publicHost, state, secondsLeft(lease));
  }

  /** Any failure as its error reply, with the refund when the money was already given back. */
  failureReply(err: unknown, requestId: string, log: Logger, paid: PaidOutcome): Reply {
    const reply = this.toErrorReply(err, requestId, log);
    if (!(err instanceof RefundedError)) return reply;
    paid.settlement = err.settlement;
    return withPayment(reply, err.settlement);
  }

  private toErrorReply(err: unknown, requestId: string, log: Logger): ErrorReply {
    if (err instanceof RequestError) {
      log.info({ code: err.code }, 'request refused');
      return errorReply(requestId, err.code, err.message);
    }
    if (err instanceof DriverError) {
      log.warn({ code: err.code, err: err.message, detail: err.detail }, 'driver failed');
      // The driver's own message may name host paths; the consumer gets a plain one.
      return err.code === 'capacity'
        ? errorReply(requestId, 'capacity_exhausted', 'this host has no room for another workload right now')
        : errorReply(requestId, 'spawn_failed', 'the workload could not be started; nothing was kept');
    }
    log.error({ err: err instanceof Error ? err.message : String(err) }, 'unexpected failure');
    return errorReply(requestId, 'internal_error', 'the provider failed unexpectedly; nothing was kept');
  }
}
