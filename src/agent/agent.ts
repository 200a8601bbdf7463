/**
 * The request pipeline: dedupe → parse → authorise → route → reply. Knows
 * requests and who owns which lease; a workload's life (spawn, readiness,
 * stop, expiry) belongs to `Workloads`, the money steps to payment-flow.ts,
 * and how messages travel to `Outbox`.
 *
 * Longer than most modules because admission before the queue (dedupe, rate,
 * refusals that are claimed or not) and the spawn and top-up paths (free
 * checks before any payment, the answer after one) each fix an order that is
 * the point, and each is one reading.
 */
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { DriverError } from '../drivers/types.js';
import { RequestError } from '../protocol/errors.js';
import { type SpawnRequest, type StatusRequest, type StopRequest, type TopupRequest } from '../protocol/requests.js';
import { parseAnyRequest, toUpstreamReply, type UpstreamKind } from '../protocol/upstream.js';
import { accessDetailsReply, errorReply, statusReply, stoppedReply, toppedUpReply, withPayment, type ErrorReply, type Reply } from '../protocol/replies.js';
import { withLogContext, type Logger } from '../util/logger.js';
import { NoticeGate, type SenderRateLimiter, type SpawnAdmission } from './admission.js';
import type { Allowlist } from './allowlist.js';
import type { Outbox, Route } from './outbox.js';
import { RefundedError, type PaymentFlow, type Settlement } from './payment-flow.js';
import type { PaymentRecord } from './payment-journal.js';
import { extendedExpiry, topupCapSeconds } from './pricing.js';
import { secondsLeft, type LeaseStore, type Lease } from './leases.js';
import { resolveResources, type Plan } from './plans.js';
import { RecentIds } from './recent-ids.js';
import { RequestQueue, type RequestQueueStats } from './request-queue.js';
import type { ClaimResult, SeenStore } from './seen.js';
import { chooseTier, type TierOffer } from './tiers.js';
import type { SpawnOutcome, Workloads } from './workloads.js';

/** One decrypted, authenticated message, transport-neutral. */
export interface Inbound {
  /** Ids that identify this message for dedupe (outer event id, request id). */
  dedupeIds: string[];
  /** Names the request in the reply. */
  requestId: string;
  /** Authenticated sender key (hex). */
  sender: string;
  /** How it arrived; replies and later notices go back the same way. */
  channel: string;
  /** Plaintext; may hold a password. Never logged. */
  content: string;
  /** Time spent verifying and decrypting the DM, for the request's log line. */
  unwrapMs?: number;
  /** When the sender says it wrote the message (unix seconds); none = now. */
  createdAt?: number;
}

/** A request dated further ahead than this is refused with `clock_skew`. */
export const MAX_FUTURE_SKEW_SECONDS = 300;
/** The window of past messages the service reads from the relays (two days plus an hour of slack). */
const READ_WINDOW_SECONDS = 2 * 86_400 + 3600;
/** A sender over a full queue hears `busy` at most once per this interval. */
const BUSY_NOTICE_INTERVAL_MS = 10_000;
/** Refused-and-unanswered message ids kept in memory (see `refuse`). */
const REFUSED_IDS_MAX = 100_000;
const REFUSED_IDS_TTL_MS = 6 * 3600 * 1000;

/** Why a message was turned away before it ran. */
export type RefusalReason = 'rate_limited' | 'busy' | 'clock_skew';

/** Counters since start; logged periodically and at shutdown by the service. */
export interface AgentStats {
  /** Messages handed to `handle`. */
  received: number;
  /** Already taken or refused (the same request again, from another relay or wrap). */
  duplicates: number;
  /** Taken into the queue (ran or will run). */
  accepted: number;
  /** Refused and answered with the code. */
  refused: Record<RefusalReason, number>;
  /** Refused without an answer (the sender was answered the same moments ago). */
  dropped: Record<'rate_limited' | 'busy', number>;
  /** Replies and refusals handed to the outbox. */
  answered: number;
  /** Replies the outbox could neither send nor keep. */
  answerFailed: number;
  queue: RequestQueueStats;
}

export interface AgentOptions {
  publicHost: string;
  tiers: readonly TierOffer[];
  plans: readonly Plan[];
  defaultPlan: string;
  maxContentBytes: number;
  maxConcurrentRequests: number;
  /** Requests waiting for a slot beyond which strangers are answered `busy` (holders of a workload have a lane of the same size). */
  maxQueuedRequests: number;
  /** Read for ownership; written only by `workloads` and by top-ups. */
  leases: LeaseStore;
  workloads: Workloads;
  seen: SeenStore;
  outbox: Outbox;
  logger: Logger;
  /** Per-sender rate limit over every request; none = unlimited (library use, tests of other parts). */
  rateLimiter?: SenderRateLimiter;
  /** Workload caps, spawns in flight, committed vCPU/RAM; none = unlimited. */
  admission?: SpawnAdmission;
  /** Who may spawn: anyone (`open`, the default), keys on `allowlist`, or anyone who pays (`paid`, needs `payment`). */
  admissionMode?: 'open' | 'allowlist' | 'paid';
  allowlist?: Allowlist;
  payment?: PaymentFlow;
}

/** How a request was shaped; its replies and its workload's later notices keep that shape. */
export type Dialect = 'v1' | 'upstream';

/** What a paid request leaves for `process` to close once its reply is in the outbox. */
interface PaidOutcome {
  settlement?: Settlement;
}

export class Agent {
  private readonly queue: RequestQueue;
  private readonly busyNotices = new NoticeGate(BUSY_NOTICE_INTERVAL_MS);
  private readonly refusedIds = new RecentIds(REFUSED_IDS_MAX, REFUSED_IDS_TTL_MS);
  private readonly counts: Omit<AgentStats, 'queue'> = {
    received: 0,
    duplicates: 0,
    accepted: 0,
    refused: { rate_limited: 0, busy: 0, clock_skew: 0 },
    dropped: { rate_limited: 0, busy: 0 },
    answered: 0,
    answerFailed: 0,
  };
  private readonly log: Logger;
  private readonly pending = new Set<Promise<void>>();
  private accepting = true;
  /** Aborted at shutdown: a request held for its claim is let go unclaimed. */
  private readonly shutdown = new AbortController();

  constructor(private readonly opts: AgentOptions) {
    this.queue = new RequestQueue(opts.maxConcurrentRequests, opts.maxQueuedRequests);
    this.log = opts.logger;
  }

  /**
   * Take one message. Returns at once for duplicates and refusals; otherwise
   * when the reply was handed to the outbox. Never throws: every failure
   * becomes an error reply.
   *
   * Order matters: everything before the queue is a map lookup, so a flood
   * costs little per message, and what waits ahead of a message is bounded
   * (a tenant's: only its own lane).
   */
  handle(msg: Inbound): Promise<void> {
    this.counts.received++;
    if (msg.dedupeIds.some((id) => this.opts.seen.has(id) || this.refusedIds.has(id))) {
      this.counts.duplicates++;
      this.log.debug({ requestId: msg.requestId }, 'duplicate message dropped');
      return Promise.resolve();
    }
    const rate = this.opts.rateLimiter?.take(msg.sender) ?? 'allow';
    if (rate !== 'allow') return this.refuse(msg, 'rate_limited', rate === 'limited');
    const nowSeconds = Math.floor(Date.now() / 1000);
    if (msg.createdAt !== undefined && msg.createdAt > nowSeconds + MAX_FUTURE_SKEW_SECONDS) {
      return this.refuse(msg, 'clock_skew', true);
    }
    // Holders of a workload wait in their own lane, served first: a flood of
    // fresh keys cannot keep a tenant from stopping or checking its VM.
    const tenant = this.opts.leases.hasOwner(msg.sender);
    const before = this.queue.stats();
    const job = this.queue.offer(async () => {
      // Claimed only when work starts: a message still queued when the agent
      // stops stays unclaimed and is read again from the relays after restart.
      if (!this.accepting) return;
      if (!(await this.claimDurably(msg))) return; // the same request from another relay got here first
      // Every line this request causes, in any module, carries its requestId.
      await withLogContext({ requestId: msg.requestId }, () => this.process(msg));
    }, { priority: tenant });
    if (!job) return this.refuse(msg, 'busy', this.busyNotices.take(msg.sender));
    this.counts.accepted++;
    if (before.running >= this.opts.maxConcurrentRequests) {
      this.log.debug({ requestId: msg.requestId, lane: tenant ? 'tenant' : 'normal', ahead: tenant ? before.queuedPriority : before.queued }, 'request queued');
    }
    return this.track(this.logFailure(job, msg.requestId));
  }

  /**
   * Take the request's ids for good before it runs (at-most-once, also across
   * power loss). While the seen-log cannot be written (full disk) the request
   * is held here, unanswered, and the claim retried with backoff: answering it
   * with an error without a durable claim would answer it again after a
   * restart. Shutdown releases it unclaimed; the next start reads it again.
   */
  private async claimDurably(msg: Inbound): Promise<boolean> {
    for (let delay = 1000; ; delay = Math.min(delay * 2, 30_000)) {
      const claim = this.opts.seen.tryClaim(msg.dedupeIds);
      if (claim === 'duplicate') return false;
      if (claim === 'claimed') {
        await this.opts.seen.synced();
        return true;
      }
      this.log.warn({ requestId: msg.requestId, retryInMs: delay }, 'request held: its claim cannot be recorded (disk full?); retrying');
      const slept = await sleep(delay, undefined, { signal: this.shutdown.signal }).then(() => true, () => false);
      if (!slept || !this.accepting) return false;
    }
  }

  /** `handle` never rejects: a throw outside process()'s own handling (e.g. the seen store's write) is logged, not left unhandled. */
  private logFailure(job: Promise<void>, requestId: string): Promise<void> {
    return job.catch((err: unknown) => {
      this.log.error({ requestId, err: err instanceof Error ? err.message : String(err) }, 'request failed before it could be answered');
    });
  }

  /**
   * Turn a message away before it runs.
   *
   * An answered refusal is claimed in the seen store like any request: the
   * client acts on the answer (e.g. retries with a new request), so the old
   * one must never run later, not even after a restart re-reads the relays.
   * It costs one append, at most once per sender per notice interval (rate
   * limiter, busy gate) or per request a fresh key signed — no more than the
   * reply itself costs.
   *
   * An unanswered refusal (the flood after the one notice) is remembered in
   * memory only, so a flood never touches the disk. At-most-once still holds:
   * the message did not run, and the in-memory set keeps relay duplicates
   * from being judged again in this run. After a restart it may be read again
   * from the relays and judged afresh; if it runs then, it runs once (claimed
   * then). Its sender was never answered about it, so nothing they did relied
   * on its refusal.
   */
  private refuse(msg: Inbound, reason: RefusalReason, answer: boolean): Promise<void> {
    if (!this.accepting) return Promise.resolve();
    if (!answer) {
      this.refusedIds.add(msg.dedupeIds);
      if (reason !== 'clock_skew') this.counts.dropped[reason]++;
      this.log.debug({ requestId: msg.requestId, reason }, 'request dropped unanswered');
      return Promise.resolve();
    }
    // A request dated ahead is remembered from its own date on: it stays
    // refused until that date has left the subscription window, instead of
    // running once the seen store's retention (counted from now) has passed.
    // The date is the sender's (up to year 9999): it counts from at most one
    // window ahead, so no entry outlives now + window + retention and a flood
    // of far-future requests cannot grow seen.log for good. A request dated
    // further ahead than the retention reaches may then be read again once its
    // refusal has expired; its sender chose that date.
    const keepFrom = reason === 'clock_skew' ? Math.min(msg.createdAt ?? 0, Math.floor(Date.now() / 1000) + READ_WINDOW_SECONDS) : undefined;
    let claim: ClaimResult;
    try {
      claim = this.opts.seen.tryClaim(msg.dedupeIds, keepFrom);
    } catch {
      claim = 'unrecorded';
    }
    if (claim === 'duplicate') return Promise.resolve();
    if (claim === 'unrecorded') {
      // Not answered, so remembered like an unanswered refusal: the other
      // relays' copies are dropped as duplicates instead of each retrying the
      // write and logging another error.
      this.refusedIds.add(msg.dedupeIds);
      this.log.error({ requestId: msg.requestId }, `request refused (${reason}) but could not be recorded; not answered`);
      return Promise.resolve();
    }
    this.counts.refused[reason]++;
    this.log.info({ requestId: msg.requestId, sender: msg.sender }, `request refused: ${reason}`);
    const route: Route = { to: msg.sender, channel: msg.channel, replyTo: msg.requestId };
    const job = this.opts.outbox
      .send(route, errorReply(msg.requestId, reason, REFUSAL_MESSAGES[reason]))
      .then(
        () => void this.counts.answered++,
        (err: Error) => {
          this.counts.answerFailed++;
          this.log.error({ err: err.message }, 'reply could not be sent');
        },
      );
    return this.track(job);
  }

  stats(): AgentStats {
    return {
      ...this.counts,
      refused: { ...this.counts.refused },
      dropped: { ...this.counts.dropped },
      queue: this.queue.stats(),
    };
  }

  /** A reloaded policy: plans and request limits apply from the next request on; work in flight keeps what it started with. */
  updatePolicy(policy: Pick<AgentOptions, 'plans' | 'defaultPlan' | 'maxContentBytes' | 'maxConcurrentRequests' | 'maxQueuedRequests'>): void {
    this.opts.plans = policy.plans;
    this.opts.defaultPlan = policy.defaultPlan;
    this.opts.maxContentBytes = policy.maxContentBytes;
    this.opts.maxConcurrentRequests = policy.maxConcurrentRequests;
    this.opts.maxQueuedRequests = policy.maxQueuedRequests;
    this.queue.setLimits(policy.maxConcurrentRequests, policy.maxQueuedRequests);
  }

  /** Who may spawn (config reload): applies from the next spawn on; running workloads keep their leases. */
  updateAdmission(admission: Pick<AgentOptions, 'admissionMode' | 'allowlist'>): void {
    this.opts.admissionMode = admission.admissionMode;
    this.opts.allowlist = admission.allowlist;
  }

  /** Stop taking new work, wait for requests in flight, and end the readiness watches (the VMs keep running). */
  async drain(): Promise<void> {
    this.accepting = false;
    this.shutdown.abort();
    // At once, not after the requests: a watch ending during the wait must not judge its VM.
    this.opts.workloads.stopWatching();
    await Promise.allSettled([...this.pending]);
    // Again: a spawn that finished during the wait started a watch.
    await this.opts.workloads.drain();
  }

  private async process(msg: Inbound): Promise<void> {
    const log = this.log.child({ requestId: msg.requestId });
    // Set for upstream-shaped (untyped) requests: the reply then carries upstream's field names too.
    let upstream: UpstreamKind | undefined;
    const paid: PaidOutcome = {};
    let answered = false;
    const respond = async (reply: Reply): Promise<void> => {
      if (answered) return void log.error({ reply: reply.type }, 'a second answer to one request was not sent');
      answered = true;
      const shaped = upstream ? toUpstreamReply(reply, { kind: upstream, plans: this.opts.plans }) : reply;
      await this.send({ to: msg.sender, channel: msg.channel, replyTo: msg.requestId }, shaped, paid, log);
    };
    let reply: Reply;
    try {
      const parsed = parseAnyRequest(msg.content, this.opts.maxContentBytes);
      if (parsed.dialect === 'upstream') upstream = parsed.kind;
      if (!parsed.ok) throw parsed.error;
      const req = parsed.request;
      log.info({ type: req.type, sender: msg.sender, channel: msg.channel, unwrapMs: msg.unwrapMs }, 'request');
      switch (req.type) {
        case 'spawn':
          // Answered inside the spawn, while its journal entry stands.
          return await this.spawn(req, msg, log, parsed.dialect, paid, respond);
        case 'topup':
          reply = await this.topup(req, msg, log, parsed.dialect, paid);
          break;
        case 'stop':
          reply = await this.stop(req, msg, log);
          break;
        case 'status':
          reply = await this.status(req, msg);
          break;
      }
    } catch (err) {
      reply = this.failureReply(err, msg.requestId, log, paid);
    }
    await respond(reply);
  }

  /** Hand a reply to the outbox; a paid request's record ends only once the outbox holds its answer. */
  private async send(route: Route, reply: Reply, paid: PaidOutcome, log: Logger): Promise<void> {
    const replyStarted = Date.now();
    try {
      await this.opts.outbox.send(route, reply);
      this.counts.answered++;
      log.info({ phase: 'reply', ms: Date.now() - replyStarted, reply: reply.type }, 'reply handed to the relays');
      // Otherwise the next start answers it again.
      if (paid.settlement) await this.opts.payment?.answered(route.replyTo!, paid.settlement);
    } catch (err) {
      this.counts.answerFailed++;
      log.error({ err: (err as Error).message }, 'reply could not be sent');
    }
  }

  private track(job: Promise<void>): Promise<void> {
    this.pending.add(job);
    // Every tracked job has a handler here: a rejection is logged, never left unhandled to end the process.
    job.then(
      () => this.pending.delete(job),
      (err: unknown) => {
        this.pending.delete(job);
        this.log.error({ err: err instanceof Error ? err.message : String(err) }, 'background task failed');
      },
    );
    return job;
  }

  private async spawn(req: SpawnRequest, msg: Inbound, log: Logger, dialect: Dialect, paid: PaidOutcome, respond: (reply: Reply) => Promise<void>): Promise<void> {
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
    // Reserved before anything touches the host; released on every way out
    // (once the spawn's outcome is known its lease, if any, counts instead).
    const reservation = this.opts.admission?.reserve(msg.sender, resources);
    try {
      const workloadId = `w-${randomBytes(6).toString('hex')}`;
      // Every free check above has passed: only now is the token looked at, and swapped.
      const payment = await this.chargeForSpawn(req, msg, dialect, resources.plan, workloadId);
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
      };
      await this.opts.workloads.spawn(order, async (outcome) => {
        reservation?.release();
        await respond(await this.spawnReply(outcome, payment, msg.requestId, log, paid));
      });
    } finally {
      reservation?.release();
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
  private async chargeForSpawn(req: SpawnRequest, msg: Inbound, dialect: Dialect, plan: Plan, workloadId: string): Promise<PaymentRecord | undefined> {
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
  private async topup(req: TopupRequest, msg: Inbound, log: Logger, dialect: Dialect, paid: PaidOutcome): Promise<Reply> {
    const flow = this.opts.payment;
    if (this.opts.admissionMode !== 'paid' || !flow) throw new RequestError('payment_required', 'this provider does not sell extensions');
    const { workloadId } = this.ownedLease(req.workload_id, msg.sender);
    return this.opts.workloads.extending(workloadId, () => this.topupInTurn(req, msg, log, dialect, paid, flow));
  }

  private async topupInTurn(req: TopupRequest, msg: Inbound, log: Logger, dialect: Dialect, paid: PaidOutcome, flow: PaymentFlow): Promise<Reply> {
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

  private async stop(req: StopRequest, msg: Inbound, log: Logger): Promise<Reply> {
    const lease = this.ownedLease(req.workload_id, msg.sender);
    await this.opts.workloads.stop(lease, log);
    return stoppedReply(msg.requestId, lease.workloadId);
  }

  private async status(req: StatusRequest, msg: Inbound): Promise<Reply> {
    const lease = this.ownedLease(req.workload_id, msg.sender);
    const state = await this.opts.workloads.inspect(lease);
    return statusReply(msg.requestId, lease, this.opts.publicHost, state, secondsLeft(lease));
  }

  /** Any failure as its error reply, with the refund when the money was already given back. */
  private failureReply(err: unknown, requestId: string, log: Logger, paid: PaidOutcome): Reply {
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

const REFUSAL_MESSAGES: Record<RefusalReason, string> = {
  rate_limited: 'too many requests from this key; slow down',
  busy: 'the provider has too many requests waiting; retry in a few seconds',
  clock_skew: `the request is dated more than ${MAX_FUTURE_SKEW_SECONDS} s in the future; check your clock and send it again`,
};
