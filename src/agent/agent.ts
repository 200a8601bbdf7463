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
import type { ComputeDriver } from '../drivers/types.js';
import { DriverError } from '../drivers/types.js';
import { RequestError, type ErrorCode } from '../protocol/errors.js';
import { type SpawnRequest, type StatusRequest, type StopRequest, type TopupRequest } from '../protocol/requests.js';
import { parseAnyRequest, toUpstreamReply, type UpstreamKind } from '../protocol/upstream.js';
import { errorReply, type AccessDetails, type PaymentFields, type PlanInfo, type Reply } from '../protocol/replies.js';
import { addLogContext, withLogContext, type Logger } from '../util/logger.js';
import { Semaphore } from '../util/semaphore.js';
import type { SenderRateLimiter, SpawnAdmission } from './admission.js';
import type { Allowlist } from './allowlist.js';
import { RefundedError, type PaymentFlow, type Settlement } from './payment-flow.js';
import type { PaymentRecord } from './payment-journal.js';
import { extendedExpiry, topupCapSeconds } from './pricing.js';
import type { InflightJournal } from './inflight.js';
import type { LeaseStore, Lease } from './leases.js';
import { resolveResources, type Plan } from './plans.js';
import type { SeenStore } from './seen.js';
import { chooseTier, type TierOffer } from './tiers.js';

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
}

export interface Route {
  to: string;
  channel: string;
  /** The request a message answers, if any. */
  replyTo?: string;
}

/** Where replies go. The service implements it over Nostr; it owns retries. */
export interface Outbox {
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
}

/** How a request was shaped; its replies and its workload's later notices keep that shape. */
export type Dialect = 'v1' | 'upstream';

/** What a paid request leaves for `process` to close once its reply is in the outbox. */
interface PaidOutcome {
  settlement?: Settlement;
}

export class Agent {
  private readonly limiter: Semaphore;
  private readonly log: Logger;
  /** Workloads with a stop in progress; a second stop waits for the first. */
  private readonly stopping = new Map<string, Promise<void>>();
  /**
   * Workloads whose readiness is being watched: a death during boot is the
   * watcher's to report (`boot_failed`), not the supervisor's (`workload_lost`).
   */
  private readonly booting = new Set<string>();
  private readonly pending = new Set<Promise<void>>();
  private accepting = true;
  /** Aborted at shutdown: readiness watches end without judging the VM. */
  private readonly shutdown = new AbortController();

  constructor(private readonly opts: AgentOptions) {
    this.limiter = new Semaphore(opts.maxConcurrentRequests);
    this.log = opts.logger;
  }

  /**
   * Take one message. Returns at once for duplicates; otherwise when the reply
   * was handed to the outbox. Never throws: every failure becomes an error reply.
   */
  handle(msg: Inbound): Promise<void> {
    if (msg.dedupeIds.some((id) => this.opts.seen.has(id))) {
      this.log.debug({ requestId: msg.requestId }, 'duplicate message dropped');
      return Promise.resolve();
    }
    // Before the queue and before JSON parsing: a flooding key costs a map
    // lookup per message, and at most one small reply per token interval.
    const rate = this.opts.rateLimiter?.take(msg.sender) ?? 'allow';
    if (rate !== 'allow') return this.refuseRate(msg, rate);
    const job = this.limiter.run(async () => {
      // Claimed only when work starts: a message still queued when the agent
      // stops stays unclaimed and is read again from the relays after restart.
      if (!this.accepting) return;
      if (!this.opts.seen.claim(msg.dedupeIds)) return; // the same request from another relay got here first
      // Every line this request causes, in any module, carries its requestId.
      await withLogContext({ requestId: msg.requestId }, () => this.process(msg));
    });
    this.track(job);
    return job;
  }

  private refuseRate(msg: Inbound, decision: 'limited' | 'drop'): Promise<void> {
    // Claimed like any request: a refused message must not run later (replay, restart).
    if (!this.accepting || !this.opts.seen.claim(msg.dedupeIds)) return Promise.resolve();
    this.log.info({ requestId: msg.requestId, sender: msg.sender, answered: decision === 'limited' }, 'request refused: rate_limited');
    if (decision === 'drop') return Promise.resolve();
    const route: Route = { to: msg.sender, channel: msg.channel, replyTo: msg.requestId };
    const job = this.opts.outbox
      .send(route, errorReply(msg.requestId, 'rate_limited', 'too many requests from this key; slow down'))
      .catch((err: Error) => this.log.error({ err: err.message }, 'reply could not be sent'));
    this.track(job);
    return job;
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
      log.info({ phase: 'reply', ms: Date.now() - replyStarted, reply: reply.type }, 'reply handed to the relays');
      // Only an answer the outbox holds ends a payment's record; otherwise the next start answers again.
      if (paid.settlement) await this.opts.payment?.answered(msg.requestId, paid.settlement);
    } catch (err) {
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

  private track(job: Promise<void>): void {
    this.pending.add(job);
    void job.finally(() => this.pending.delete(job));
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
    // Already set for a new spawn (spawnAdmitted); set here for a watch resumed after a restart.
    this.booting.add(workloadId);
    const result = await driver
      .waitReady(workloadId, { timeoutMs, signal: this.shutdown.signal })
      .finally(() => this.booting.delete(workloadId));
    if (result.ready) {
      log.info({ workloadId, ms: result.ms }, 'workload ready');
      // Upstream's client takes the first DM it sees for its reply: no unprompted `ready` for it.
      if (lease.dialect !== 'upstream') await this.opts.outbox.send(route, { type: 'ready', ...base, ms: result.ms }).catch(() => undefined);
      const current = this.opts.leases.get(workloadId);
      if (current) await this.opts.leases.put({ ...current, readyAt: new Date().toISOString() }).catch((err: Error) => log.error({ err: err.message }, 'could not record readiness in the lease'));
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
    const owed = await this.oweForBootFailure(this.opts.leases.get(workloadId) ?? lease, message, log);
    await this.destroyLease(lease, log).catch((err: Error) => log.error({ err: err.message }, 'cleanup after boot failure failed'));
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
    // Reserved before anything touches the host; released on every way out
    // (after lease.put the lease itself counts).
    const reservation = this.opts.admission?.reserve(msg.sender, resources);
    try {
      const workloadId = `w-${randomBytes(6).toString('hex')}`;
      // Every free check above has passed: only now is the token looked at, and swapped.
      const payment = await this.chargeForSpawn(req, msg, dialect, resources.plan, workloadId);
      if (!payment) return await this.spawnAdmitted(req, msg, log, resources, tier, driver, workloadId, dialect, resources.plan.durationSeconds);
      let reply: Reply;
      try {
        const held = { mint: payment.mint, unit: payment.unit, msats: (payment.msats ?? 0) - (payment.refundMsats ?? 0) };
        reply = await this.spawnAdmitted(req, msg, log, resources, tier, driver, workloadId, dialect, payment.seconds ?? 0, held);
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
    const lease = this.ownedLease(req.workload_id, msg.sender);
    if (this.isStopping(lease.workloadId) || secondsLeft(lease) <= 0) throw new RequestError('not_found', `no workload ${req.workload_id} for this key`);
    const plan = this.opts.plans.find((p) => p.id === lease.planId);
    if (!plan?.rateMsatsPerSec) throw new RequestError('payment_required', 'this workload\'s plan is free: it cannot be extended');
    const ctx = { ref: msg.requestId, kind: 'topup' as const, sender: msg.sender, channel: msg.channel, dialect, workloadId: lease.workloadId };
    const payment = await flow.charge(ctx, req.cashu_token, plan.rateMsatsPerSec, topupCapSeconds(secondsLeft(lease), flow.policy));
    const seconds = payment.seconds ?? 0;
    const current = this.opts.leases.get(lease.workloadId);
    if (!current || this.isStopping(current.workloadId) || secondsLeft(current) <= 0) {
      const message = 'the workload ended while the payment was made; your payment is refunded';
      paid.settlement = await flow.finish(payment, false, { code: 'not_found', message });
      return { ...errorReply(msg.requestId, 'not_found', message), ...paymentFields(paid.settlement) };
    }
    const charged = (payment.msats ?? 0) - (payment.refundMsats ?? 0);
    const extended: Lease = {
      ...current,
      expiresAt: extendedExpiry(current.expiresAt, seconds),
      paidRefs: [...(current.paidRefs ?? []).slice(-15), msg.requestId],
      // One mint and unit per lease's holding; a top-up from another mint is not given back on a failed boot.
      ...(!current.paid || (current.paid.mint === payment.mint && current.paid.unit === payment.unit)
        ? { paid: { mint: payment.mint, unit: payment.unit, msats: (current.paid?.msats ?? 0) + charged } }
        : {}),
    };
    try {
      await this.opts.leases.put(extended);
    } catch (err) {
      paid.settlement = await flow.finish(payment, false, { code: 'internal_error', message: 'the lease could not be extended; your payment is refunded' });
      throw new RefundedError('internal_error', 'the lease could not be extended; your payment is refunded', paid.settlement);
    }
    log.info({ workloadId: current.workloadId, seconds, expiresAt: extended.expiresAt }, 'lease extended');
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
        const lease = this.opts.leases.get(record.workloadId);
        if (!lease) return false;
        return record.kind === 'spawn' ? lease.requestId === record.ref : (lease.paidRefs ?? []).includes(record.ref);
      },
      async (record, money) => {
        const lease = this.opts.leases.get(record.workloadId);
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
  ): Promise<Reply> {
    const wlog = log.child({ workloadId });
    addLogContext({ workloadId });
    const started = Date.now();
    await this.opts.inflight.begin({
      requestId: msg.requestId,
      sender: msg.sender,
      channel: msg.channel,
      workloadId,
      driver: tier.driver,
      startedAt: new Date(started).toISOString(),
    });
    const handle = await driver.create({
      id: workloadId,
      hostname: workloadId,
      vcpus: resources.vcpus,
      memoryMb: resources.memoryMb,
      diskGb: resources.diskGb,
      rootPassword: req.root_password,
      sshKeys: req.ssh_keys ?? [],
    });
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
    this.booting.add(workloadId);
    wlog.info({ sshPort: handle.sshPort, tier: tier.level, ms: Date.now() - started }, 'workload started');
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

  /** True while a stop of this workload is under way. */
  isStopping(workloadId: string): boolean {
    return this.stopping.has(workloadId);
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
