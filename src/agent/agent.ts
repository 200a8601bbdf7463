/**
 * The request pipeline: dedupe → rate → date → queue → claim → parse → route
 * → reply. Decides whether a message runs at all (and whether a refusal is
 * answered and claimed) and sends what runs' handlers return; what each
 * request does is in handlers.ts, a workload's life in workloads.ts, and how
 * messages travel behind `Outbox`.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { parseAnyRequest, toUpstreamReply, type UpstreamKind } from '../protocol/upstream.js';
import { errorReply, type Reply } from '../protocol/replies.js';
import { withLogContext, type Logger } from '../util/logger.js';
import { Jobs } from '../util/jobs.js';
import { NoticeGate, type SenderRateLimiter } from './admission.js';
import { RequestHandlers, type HandlerOptions, type PaidOutcome } from './handlers.js';
import type { Outbox, Route } from './outbox.js';
import { RecentIds } from './recent-ids.js';
import { RequestQueue, type RequestQueueStats } from './request-queue.js';
import type { ClaimResult, SeenStore } from './seen.js';

export type { Dialect } from '../protocol/upstream.js';

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

export interface AgentOptions extends HandlerOptions {
  maxContentBytes: number;
  maxConcurrentRequests: number;
  /** Requests waiting for a slot beyond which strangers are answered `busy` (holders of a workload have a lane of the same size). */
  maxQueuedRequests: number;
  seen: SeenStore;
  outbox: Outbox;
  logger: Logger;
  /** Per-sender rate limit over every request; none = unlimited (library use, tests of other parts). */
  rateLimiter?: SenderRateLimiter;
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
  private readonly handlers: RequestHandlers;
  private readonly pending: Jobs;
  private accepting = true;
  /** Aborted at shutdown: a request held for its claim is let go unclaimed. */
  private readonly shutdown = new AbortController();

  constructor(private readonly opts: AgentOptions) {
    this.queue = new RequestQueue(opts.maxConcurrentRequests, opts.maxQueuedRequests);
    this.log = opts.logger;
    this.pending = new Jobs((err: unknown) => this.log.error({ err: err instanceof Error ? err.message : String(err) }, 'background task failed'));
    // The same options object: updatePolicy and updateAdmission reach the handlers too.
    this.handlers = new RequestHandlers(opts);
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
    return this.pending.track(this.logFailure(job, msg.requestId));
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
    return this.pending.track(job);
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
    await this.pending.settled();
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
          return await this.handlers.spawn(req, msg, log, parsed.dialect, paid, respond);
        case 'topup':
          reply = await this.handlers.topup(req, msg, log, parsed.dialect, paid);
          break;
        case 'stop':
          reply = await this.handlers.stop(req, msg, log);
          break;
        case 'status':
          reply = await this.handlers.status(req, msg);
          break;
      }
    } catch (err) {
      reply = this.handlers.failureReply(err, msg.requestId, log, paid);
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
}

const REFUSAL_MESSAGES: Record<RefusalReason, string> = {
  rate_limited: 'too many requests from this key; slow down',
  busy: 'the provider has too many requests waiting; retry in a few seconds',
  clock_skew: `the request is dated more than ${MAX_FUTURE_SKEW_SECONDS} s in the future; check your clock and send it again`,
};
