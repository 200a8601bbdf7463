/**
 * The request pipeline: dedupe → parse → authorise → choose tier → driver →
 * lease → reply. Knows requests, leases and drivers; knows nothing of how
 * messages travel (Nostr lives behind `Outbox`) or how VMs run (behind
 * `ComputeDriver`).
 *
 * Longer than most modules because the spawn and top-up paths fix the order
 * of free checks before any payment, and the answers after one; the money
 * steps themselves live in payment-flow.ts.
 */
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { ComputeDriver } from '../drivers/types.js';
import { DriverError } from '../drivers/types.js';
import { RequestError, type ErrorCode } from '../protocol/errors.js';
import { type SpawnRequest, type StatusRequest, type StopRequest, type TopupRequest } from '../protocol/requests.js';
import { parseAnyRequest, toUpstreamReply, type UpstreamKind } from '../protocol/upstream.js';
import { errorReply, type AccessDetails, type PaymentFields, type PlanInfo, type Reply } from '../protocol/replies.js';
import { KeyedTurns } from '../util/keyed-turns.js';
import { addLogContext, withLogContext, type Logger } from '../util/logger.js';
import { NoticeGate, type Reservation, type SenderRateLimiter, type SpawnAdmission } from './admission.js';
import type { Allowlist } from './allowlist.js';
import { RefundedError, type PaymentFlow, type Settlement } from './payment-flow.js';
import type { PaymentRecord } from './payment-journal.js';
import { extendedExpiry, topupCapSeconds } from './pricing.js';
import type { InflightJournal } from './inflight.js';
import type { LeaseStore, Lease } from './leases.js';
import { resolveResources, type Plan } from './plans.js';
import { RecentIds } from './recent-ids.js';
import { RequestQueue, type RequestQueueStats } from './request-queue.js';
import type { ClaimResult, SeenStore } from './seen.js';
import { chooseTier, type TierOffer } from './tiers.js';
import type { PoolClaim, WarmPool } from './warm-pool.js';

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

export interface Route {
  to: string;
  channel: string;
  /** The request a message answers, if any. */
  replyTo?: string;
}

/** Where replies go. The service implements it over Nostr; it owns retries. */
export interface Outbox {
  /**
   * Resolves once the message survives a crash (a relay took it, or it is on
   * disk for retries; one carrying a refund_token is never given up); rejects
   * otherwise. A payment's record ends only on a resolved send.
   */
  send(route: Route, message: Reply | Record<string, unknown>): Promise<void>;
}

export interface AgentOptions {
  publicHost: string;
  tiers: readonly TierOffer[];
  drivers: Readonly<Record<string, ComputeDriver>>;
  plans: readonly Plan[];
  defaultPlan: string;
  maxContentBytes: number;
  maxConcurrentRequests: number;
  /** Requests waiting for a slot beyond which strangers are answered `busy` (holders of a workload have a lane of the same size). */
  maxQueuedRequests: number;
  /** How long a guest may take to become ready before it is deleted with `boot_failed`. */
  readyTimeoutMs: number;
  leases: LeaseStore;
  seen: SeenStore;
  inflight: InflightJournal;
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
  /** Idle VMs to hand to spawns of their plan (plans with `warmPool` > 0); none = every spawn boots cold. */
  warmPool?: WarmPool;
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
  /** Workloads with a stop in progress; a second stop waits for the first. */
  private readonly stopping = new Map<string, Promise<void>>();
  /**
   * Workloads whose failed boot is being refunded, from before the refund is
   * counted until their stop begins: a top-up now would be paid into a lease
   * whose holding was already counted, so none is taken.
   */
  private readonly closing = new Set<string>();
  /**
   * Workloads whose readiness is being watched: a death during boot is the
   * watcher's to report (`boot_failed`), not the supervisor's (`workload_lost`).
   */
  private readonly booting = new Set<string>();
  private readonly pending = new Set<Promise<void>>();
  /**
   * The top-up of each workload under way, from its checks to its lease
   * write: top-ups of one workload run one at a time, so each one's cap is
   * computed from the lease the one before left.
   */
  private readonly topups = new KeyedTurns();
  private accepting = true;
  /** Aborted at shutdown: readiness watches end without judging the VM. */
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

  /** Stop taking new work and wait for requests in flight. */
  async drain(): Promise<void> {
    this.accepting = false;
    this.shutdown.abort();
    await Promise.allSettled([...this.pending]);
  }

  private async process(msg: Inbound): Promise<void> {
    const log = this.log.child({ requestId: msg.requestId });
    const route: Route = { to: msg.sender, channel: msg.channel, replyTo: msg.requestId };
    let reply: Reply;
    // Set for upstream-shaped (untyped) requests: the reply then carries upstream's field names too.
    let upstream: UpstreamKind | undefined;
    // Only a spawn writes a journal entry (spawnAdmitted), so only a spawn has one to end.
    let journaled = false;
    const paid: PaidOutcome = {};
    try {
      const parsed = parseAnyRequest(msg.content, this.opts.maxContentBytes);
      if (parsed.dialect === 'upstream') upstream = parsed.kind;
      if (!parsed.ok) throw parsed.error;
      const req = parsed.request;
      log.info({ type: req.type, sender: msg.sender, channel: msg.channel, unwrapMs: msg.unwrapMs }, 'request');
      switch (req.type) {
        case 'spawn':
          journaled = true;
          reply = await this.spawn(req, msg, log, parsed.dialect, paid);
          break;
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
      reply = this.toErrorReply(err, msg.requestId, log);
      if (err instanceof RefundedError) {
        paid.settlement = err.settlement;
        reply = { ...reply, ...paymentFields(err.settlement) };
      }
    }
    if (upstream) reply = toUpstreamReply(reply, { kind: upstream, plans: this.opts.plans });
    const replyStarted = Date.now();
    try {
      await this.opts.outbox.send(route, reply);
      this.counts.answered++;
      log.info({ phase: 'reply', ms: Date.now() - replyStarted, reply: reply.type }, 'reply handed to the relays');
      // Only an answer the outbox holds ends a payment's record; otherwise the next start answers again.
      if (paid.settlement) await this.opts.payment?.answered(msg.requestId, paid.settlement);
    } catch (err) {
      this.counts.answerFailed++;
      log.error({ err: (err as Error).message }, 'reply could not be sent');
    }
    if (journaled) await this.opts.inflight.end(msg.requestId).catch((err: Error) => log.error({ err: err.message }, 'could not remove the spawn journal entry'));
    if (reply.type === 'access_details') this.track(this.watchReady(reply.workload_id, log, this.opts.readyTimeoutMs));
  }

  /**
   * Pick up the readiness watch of a re-adopted workload that had not been
   * reported ready when the previous run stopped; the deadline still counts
   * from its creation (with a short grace to look at it at least once).
   */
  resumeReadiness(lease: Lease): void {
    if (lease.readyAt) return;
    const left = this.opts.readyTimeoutMs - (Date.now() - Date.parse(lease.createdAt));
    this.track(this.watchReady(lease.workloadId, this.log.child({ requestId: lease.requestId }), Math.max(left, 15_000)));
  }

  private track(job: Promise<void>): Promise<void> {
    this.pending.add(job);
    // Every tracked job has a handler here: a rejection (a bug in a readiness
    // watch, say) is logged, never left unhandled to end the process.
    job.then(
      () => this.pending.delete(job),
      (err: unknown) => {
        this.pending.delete(job);
        this.log.error({ err: err instanceof Error ? err.message : String(err) }, 'background task failed');
      },
    );
    return job;
  }

  /**
   * The access details go out as soon as the VM process exists; this follows
   * up with `ready` once the guest accepts logins, or `boot_failed` (and the
   * VM is deleted) if it dies or misses the deadline.
   */
  private async watchReady(workloadId: string, log: Logger, timeoutMs: number): Promise<void> {
    const lease = this.opts.leases.get(workloadId);
    const driver = lease && this.opts.drivers[lease.driver];
    if (!lease || !driver) {
      this.booting.delete(workloadId);
      return;
    }
    const route: Route = { to: lease.owner, channel: lease.channel, replyTo: lease.requestId };
    const base = { version: 1, request_id: lease.requestId, workload_id: workloadId } as const;
    if (lease.readyAt) {
      // A pool VM handed off before the access details went out: ready at once.
      if (lease.dialect !== 'upstream') await this.opts.outbox.send(route, { type: 'ready', ...base, ms: 0 }).catch(() => undefined);
      return;
    }
    // Already set for a new spawn (spawnAdmitted); set here for a watch resumed after a restart.
    this.booting.add(workloadId);
    const result = await driver
      .waitReady(workloadId, { timeoutMs, signal: this.shutdown.signal })
      .finally(() => this.booting.delete(workloadId));
    if (result.ready) {
      log.info({ workloadId, ms: result.ms }, 'workload ready');
      // Upstream's client takes the first DM it sees for its reply: no unprompted `ready` for it.
      if (lease.dialect !== 'upstream') await this.opts.outbox.send(route, { type: 'ready', ...base, ms: result.ms }).catch(() => undefined);
      const readyAt = new Date().toISOString();
      await this.opts.leases.update(workloadId, (current) => ({ ...current, readyAt })).catch((err: Error) => log.error({ err: err.message }, 'could not record readiness in the lease'));
      return;
    }
    // Shutting down is not a boot failure: the VM stays, the next run re-adopts it.
    if (this.shutdown.signal.aborted || this.isStopping(workloadId) || !this.opts.leases.get(workloadId)) return;
    log.warn({ workloadId, reason: result.reason, ms: result.ms }, 'workload failed to boot');
    const message =
      result.reason === 'died'
        ? 'the VM stopped during boot; it was deleted'
        : `the VM did not become ready within ${Math.round(this.opts.readyTimeoutMs / 1000)} s of its start; it was deleted`;
    // Nothing was delivered: what the lease holds goes back, journaled before the VM (and its lease) goes.
    // Closed first, so no top-up lands after the holding is read; one already paying finishes (or is refunded) before it is.
    this.closing.add(workloadId);
    await this.topups.settled(workloadId);
    const owed = await this.oweForBootFailure(this.opts.leases.get(workloadId) ?? lease, message, log);
    // The stop marks the workload stopping at once: the closing mark is no longer needed.
    const teardown = this.destroyLease(lease, log);
    this.closing.delete(workloadId);
    await teardown.catch((err: Error) => log.error({ err: err.message }, 'cleanup after boot failure failed'));
    const money = owed && (await this.opts.payment!.refundOwed(owed));
    const notice = this.bootFailedNotice(lease, result.reason, message, result.consoleTail, money);
    if (!notice) return;
    const sent = await this.opts.outbox.send(route, notice).then(
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
  private bootFailedNotice(
    lease: Pick<Lease, 'requestId' | 'workloadId' | 'dialect'>,
    reason: 'died' | 'timeout',
    message: string,
    consoleTail: string,
    money?: Settlement,
  ): Reply | undefined {
    const refund = money ? paymentFields(money) : {};
    if (lease.dialect === 'upstream') {
      if (!money) return undefined;
      return toUpstreamReply({ ...errorReply(lease.requestId, 'spawn_failed', message), ...refund }, { kind: 'spawn', plans: this.opts.plans });
    }
    return { type: 'boot_failed', version: 1, request_id: lease.requestId, workload_id: lease.workloadId, reason, message, console: consoleTail, ...refund };
  }

  private async spawn(req: SpawnRequest, msg: Inbound, log: Logger, dialect: Dialect, paid: PaidOutcome): Promise<Reply> {
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
    const driver = this.opts.drivers[tier.driver];
    if (!driver) throw new Error(`tier ${tier.level} names driver ${tier.driver}, which is not running`);
    // A pool VM leaves the pool before the reservation, which then counts it
    // once; it goes back untouched on any way out before its hand-off.
    const claim = this.opts.warmPool?.take(tier.driver, resources);
    // Reserved before anything touches the host; released on every way out
    // (after lease.put the lease itself counts).
    let reservation: Reservation | undefined;
    try {
      reservation = this.opts.admission?.reserve(msg.sender, resources);
      if (!claim) this.opts.warmPool?.refuseWhenEmpty(tier.driver, resources);
      const workloadId = claim?.id ?? `w-${randomBytes(6).toString('hex')}`;
      // Every free check above has passed: only now is the token looked at, and swapped.
      const payment = await this.chargeForSpawn(req, msg, dialect, resources.plan, workloadId);
      if (!payment) return await this.spawnAdmitted(req, msg, log, resources, tier, driver, workloadId, dialect, resources.plan.durationSeconds, undefined, claim);
      let reply: Reply;
      try {
        const held = { mint: payment.mint, unit: payment.unit, msats: (payment.msats ?? 0) - (payment.refundMsats ?? 0) };
        reply = await this.spawnAdmitted(req, msg, log, resources, tier, driver, workloadId, dialect, payment.seconds ?? 0, held, claim);
      } catch (err) {
        const refused = this.toErrorReply(err, msg.requestId, log);
        paid.settlement = await this.opts.payment!.finish(payment, false, {
          code: refused.type === 'error' ? refused.code : 'spawn_failed',
          message: `${refused.type === 'error' ? refused.message : 'the workload could not be started'}; your payment is refunded`,
        });
        return { ...refused, ...paymentFields(paid.settlement) } as Reply;
      }
      paid.settlement = await this.opts.payment!.finish(payment, true);
      return { ...reply, ...paymentFields(paid.settlement) } as Reply;
    } finally {
      reservation?.release();
      claim?.release();
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
    return this.topups.run(workloadId, () => this.topupInTurn(req, msg, log, dialect, paid, flow));
  }

  private async topupInTurn(req: TopupRequest, msg: Inbound, log: Logger, dialect: Dialect, paid: PaidOutcome, flow: PaymentFlow): Promise<Reply> {
    const lease = this.ownedLease(req.workload_id, msg.sender);
    if (this.isStopping(lease.workloadId) || secondsLeft(lease) <= 0) throw new RequestError('not_found', `no workload ${req.workload_id} for this key`);
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
        if (this.isStopping(current.workloadId) || secondsLeft(current) <= 0) return current;
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
      return { ...errorReply(msg.requestId, 'not_found', message), ...paymentFields(paid.settlement) };
    }
    log.info({ workloadId: lease.workloadId, seconds, expiresAt: extended.expiresAt }, 'lease extended');
    paid.settlement = await flow.finish(payment, true);
    return this.toppedUp(msg.requestId, extended, seconds, paid.settlement);
  }

  private toppedUp(requestId: string, lease: Lease, seconds: number, money: Settlement): Reply {
    return { type: 'topped_up', version: 1, request_id: requestId, workload_id: lease.workloadId, extended_seconds: seconds, expires_at: lease.expiresAt, ...paymentFields(money) };
  }

  /**
   * At start, after the wallet's recovery and before the spawn journal's:
   * settle what a killed run left half-paid, and answer those consumers (a
   * spawn's access details or its failure, with any refund).
   */
  async reconcilePayments(): Promise<void> {
    const flow = this.opts.payment;
    if (!flow) return;
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
        const lease = this.opts.leases.get(record.workloadId);
        if (lease && `${lease.requestId}.boot` === record.ref) await this.destroyLease(lease);
      },
      async (record, money) => {
        const lease = this.leaseOfPayment(record);
        let reply: Reply | undefined;
        if (record.failure?.code === 'boot_failed') {
          const requestId = record.ref.replace(/\.boot$/, '');
          reply = this.bootFailedNotice({ requestId, workloadId: record.workloadId, dialect: record.dialect }, 'died', record.failure.message, '', money);
          if (reply) await this.opts.outbox.send({ to: record.sender, channel: record.channel, replyTo: requestId }, reply);
          return;
        }
        if (record.phase === 'leased' && lease) {
          reply = record.kind === 'spawn' ? this.accessDetails(lease) : this.toppedUp(record.ref, lease, record.seconds ?? 0, money);
          reply = { ...reply, ...paymentFields(money) } as Reply;
        } else {
          const failure = record.failure ?? { code: 'spawn_failed', message: 'the request failed' };
          reply = { ...errorReply(record.ref, failure.code as ErrorCode, failure.message), ...paymentFields(money) };
        }
        if (record.dialect === 'upstream') reply = toUpstreamReply(reply, { kind: record.kind, plans: this.opts.plans });
        await this.opts.outbox.send({ to: record.sender, channel: record.channel, replyTo: record.ref }, reply);
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

  private async spawnAdmitted(
    req: SpawnRequest,
    msg: Inbound,
    log: Logger,
    resources: ReturnType<typeof resolveResources>,
    tier: TierOffer,
    driver: ComputeDriver,
    workloadId: string,
    dialect: Dialect,
    leaseSeconds: number,
    paid?: Lease['paid'],
    claim?: PoolClaim,
  ): Promise<Reply> {
    const started = Date.now();
    // The journal names the workload before the host is touched for it (each pool VM tried, then a cold one).
    const journal = (id: string) =>
      this.opts.inflight.begin({ requestId: msg.requestId, sender: msg.sender, channel: msg.channel, workloadId: id, driver: tier.driver, startedAt: new Date(started).toISOString() });
    const spec = {
      id: workloadId,
      hostname: workloadId,
      vcpus: resources.vcpus,
      memoryMb: resources.memoryMb,
      diskGb: resources.diskGb,
      rootPassword: req.root_password,
      sshKeys: req.ssh_keys ?? [],
    };
    const { handle, pooled } = this.opts.warmPool
      ? await this.opts.warmPool.acquire(claim, driver, spec, resources, journal, log)
      : await journal(workloadId).then(async () => ({ handle: await driver.create(spec), pooled: false }));
    // A pool VM keeps its own id.
    workloadId = handle.id;
    const wlog = log.child({ workloadId });
    addLogContext({ workloadId });
    const createdAt = new Date();
    const lease: Lease = {
      workloadId,
      owner: msg.sender,
      requestId: msg.requestId,
      channel: msg.channel,
      isolationLevel: tier.level,
      driver: tier.driver,
      planId: resources.plan.id,
      planName: resources.plan.name,
      vcpus: resources.vcpus,
      memoryMb: resources.memoryMb,
      diskGb: resources.diskGb,
      sshPort: handle.sshPort,
      createdAt: createdAt.toISOString(),
      expiresAt: new Date(createdAt.getTime() + leaseSeconds * 1000).toISOString(),
      ...(dialect === 'upstream' ? { dialect } : {}),
      ...(paid ? { paid } : {}),
      // A handed-off pool VM already takes the tenant's login: no boot to watch.
      ...(pooled ? { readyAt: createdAt.toISOString() } : {}),
    };
    try {
      await this.opts.leases.put(lease);
    } catch (err) {
      // Without a lease nobody could ever stop it: give the VM back.
      await driver.destroy(workloadId).catch(() => undefined);
      throw err;
    }
    // Booting from the moment the lease exists, not from when the readiness
    // watch starts after the reply went out: in between, the supervisor would
    // otherwise report a death during boot as workload_lost instead of
    // leaving it to the watch (boot_failed).
    if (!pooled) this.booting.add(workloadId);
    wlog.info({ sshPort: handle.sshPort, tier: tier.level, pooled, ms: Date.now() - started }, 'workload started');
    return this.accessDetails(lease);
  }

  /** The access-details reply for a lease (also re-sent after a restart interrupted the first one). */
  accessDetails(lease: Lease): AccessDetails {
    return {
      type: 'access_details',
      version: 1,
      request_id: lease.requestId,
      workload_id: lease.workloadId,
      host: this.opts.publicHost,
      ssh_port: lease.sshPort,
      ssh_user: 'root',
      isolation_level: lease.isolationLevel,
      expires_at: lease.expiresAt,
      plan: leasePlan(lease),
    };
  }

  /** The access details again (after a restart cut the first reply short), in the shape its owner's client reads. */
  resentAccessDetails(lease: Lease): Reply {
    const reply = this.accessDetails(lease);
    return lease.dialect === 'upstream' ? toUpstreamReply(reply, { kind: 'spawn', plans: this.opts.plans }) : reply;
  }

  /** True while the readiness watch of this workload runs (it has not been reported ready or failed yet). */
  isBooting(workloadId: string): boolean {
    return this.booting.has(workloadId);
  }

  /** True while a payment of request `requestId` is unsettled or unanswered: its answer comes from the payment journal. */
  holdsPayment(requestId: string): boolean {
    return this.opts.payment?.holds(requestId) ?? false;
  }

  /** True while a stop of this workload is under way, or its failed boot is being refunded before one. */
  isStopping(workloadId: string): boolean {
    return this.stopping.has(workloadId) || this.closing.has(workloadId);
  }

  /** The caller's own lease, or `not_found` — the same answer whether it exists for someone else or not at all. */
  private ownedLease(workloadId: string, sender: string): Lease {
    const lease = this.opts.leases.get(workloadId);
    if (!lease || lease.owner !== sender) throw new RequestError('not_found', `no workload ${workloadId} for this key`);
    return lease;
  }

  private async stop(req: StopRequest, msg: Inbound, log: Logger): Promise<Reply> {
    const lease = this.ownedLease(req.workload_id, msg.sender);
    await this.destroyLease(lease, log);
    return { type: 'stopped', version: 1, request_id: msg.requestId, workload_id: lease.workloadId };
  }

  /** Tear a workload down and drop its lease; concurrent calls share one teardown. */
  destroyLease(lease: Lease, log: Logger = this.log): Promise<void> {
    let running = this.stopping.get(lease.workloadId);
    if (!running) {
      const driver = this.opts.drivers[lease.driver];
      running = (async () => {
        if (driver) await driver.destroy(lease.workloadId);
        await this.opts.leases.delete(lease.workloadId);
        log.info({ workloadId: lease.workloadId }, 'workload stopped');
      })().finally(() => this.stopping.delete(lease.workloadId));
      this.stopping.set(lease.workloadId, running);
    }
    return running;
  }

  private async status(req: StatusRequest, msg: Inbound): Promise<Reply> {
    const lease = this.ownedLease(req.workload_id, msg.sender);
    const driver = this.opts.drivers[lease.driver];
    const seen = driver ? await driver.inspect(lease.workloadId) : { state: 'gone' as const };
    return {
      type: 'status',
      version: 1,
      request_id: msg.requestId,
      workload_id: lease.workloadId,
      state: seen.state,
      host: this.opts.publicHost,
      ssh_port: lease.sshPort,
      isolation_level: lease.isolationLevel,
      expires_at: lease.expiresAt,
      seconds_left: secondsLeft(lease),
      plan: leasePlan(lease),
    };
  }

  private toErrorReply(err: unknown, requestId: string, log: Logger): Reply {
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

function paymentFields(money: Settlement): PaymentFields {
  return {
    paid_msats: money.paidMsats,
    refund_msats: money.refundMsats,
    ...(money.refundToken ? { refund_token: money.refundToken } : {}),
  };
}

function leasePlan(lease: Lease): PlanInfo {
  return { id: lease.planId, name: lease.planName, vcpus: lease.vcpus, memory_mb: lease.memoryMb, disk_gb: lease.diskGb };
}

export function secondsLeft(lease: Lease, now = Date.now()): number {
  return Math.max(0, Math.floor((Date.parse(lease.expiresAt) - now) / 1000));
}
