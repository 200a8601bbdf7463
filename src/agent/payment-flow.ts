/**
 * Taking a consumer's money for a spawn or a top-up, and giving back what
 * was not sold. The order is the point (upstream redeems first and keeps
 * everything on any later failure):
 *
 *   1. `charge`: offline quote (format, mint, unit, fees) and the minimum —
 *      refused here, the token is untouched; journal `quoted`; swap; journal
 *      `redeemed` with the msats and the seconds they buy.
 *   2. the caller gives the lease (or fails to).
 *   3. `finish`: leased or failed, then the refund (cap surplus, or all of it)
 *      as a token, journaled before it is shown to anyone.
 *   4. `answered`: the reply is in the outbox; the record goes.
 *
 * `reconcile` runs the same steps for records a killed run left behind.
 * Knows the journal and the `Payments` contract; no Nostr, no drivers.
 */
import { RequestError, type ErrorCode } from '../protocol/errors.js';
import type { Dialect } from '../protocol/upstream.js';
import { PaymentError, type Payments } from '../payment/types.js';
import type { Logger } from '../util/logger.js';
import { nextStep, settle, type PaymentJournal, type PaymentRecord } from './payment-journal.js';
import { leaseTerms, type PricingPolicy } from './pricing.js';

export interface ChargeContext {
  ref: string;
  kind: 'spawn' | 'topup';
  sender: string;
  channel: string;
  dialect: Dialect;
  workloadId: string;
}

/** What the consumer learns about the money in a reply. */
export interface Settlement {
  paidMsats: number;
  refundMsats: number;
  /** Absent when a refund is owed but could not be made yet (mint unreachable); it is retried at the next start. */
  refundToken?: string;
}

/** A request refused after its token was swapped: the reply carries the refund. */
export class RefundedError extends RequestError {
  constructor(
    code: ErrorCode,
    message: string,
    readonly settlement: Settlement,
  ) {
    super(code, message);
    this.name = 'RefundedError';
  }
}

/** Swap errors after which the token is certainly still the consumer's. */
const UNTOUCHED: ReadonlySet<string> = new Set([
  'invalid_token',
  'token_already_spent',
  'token_pending',
  'non_whitelisted_mint',
  'unsupported_unit',
  'insufficient_payment',
]);

export interface PaymentFlowOptions {
  payments: Payments;
  journal: PaymentJournal;
  policy: PricingPolicy;
  logger: Logger;
}

export class PaymentFlow {
  constructor(private readonly opts: PaymentFlowOptions) {}

  /** New bounds (config reload): the next spawn or top-up is priced by them. */
  setPolicy(policy: PricingPolicy): void {
    this.opts.policy = policy;
  }

  get policy(): PricingPolicy {
    return this.opts.policy;
  }

  /**
   * Steps 1: returns the journaled record (phase `redeemed`, `seconds` set)
   * or throws a RequestError with the token untouched. `capSeconds` is how
   * long the lease may still grow.
   */
  async charge(ctx: ChargeContext, token: string, rateMsatsPerSec: number, capSeconds: number): Promise<PaymentRecord> {
    const quote = await this.opts.payments.quote(token).catch(asRequestError);
    const cheapest = leaseTerms(quote.netMsats, rateMsatsPerSec, capSeconds, this.opts.policy);
    if (!cheapest.ok) throw refusal(cheapest.reason, cheapest.neededMsats, this.opts.policy);
    let record: PaymentRecord = { ...ctx, mint: quote.mint, unit: quote.unit, phase: 'quoted', token, createdAt: new Date().toISOString() };
    await this.opts.journal.put(record);
    let received;
    try {
      received = await this.opts.payments.redeem(token, ctx.ref);
    } catch (err) {
      // Certainly untouched: nothing happened. Anything else (a plain error
      // included: the swap may have happened before a local write failed)
      // leaves the record `quoted`; the next start swaps again by ref and refunds.
      if (certainlyUntouched(err)) {
        await this.opts.journal.done(ctx.ref);
        throw asRequestErrorOf(err);
      }
      const code = err instanceof PaymentError ? err.code : 'internal_error';
      this.opts.logger.warn({ ref: ctx.ref, code, err: (err as Error).message }, 'swap outcome unknown; kept in the payment journal for the next start');
      throw new RequestError(code as ErrorCode, IN_DOUBT_MESSAGE);
    }
    // The fees the quote assumed may have changed at the mint: the terms are recomputed on what arrived.
    const terms = leaseTerms(received.msats, rateMsatsPerSec, capSeconds, this.opts.policy, received.unit === 'sat' ? 1000 : 1);
    record = { ...record, token: undefined, phase: 'redeemed', msats: received.msats };
    if (terms.ok) record = { ...record, seconds: terms.seconds, refundMsats: terms.refundMsats };
    else record = settle(record, false, { code: 'insufficient_payment', message: 'the swap at the mint left less than the minimum; refunded' });
    await this.opts.journal.put(record);
    this.opts.logger.info({ ref: ctx.ref, msats: received.msats, seconds: record.seconds, mint: quote.mint }, 'payment received');
    if (!terms.ok) {
      const money = await this.refund(record);
      const refused = refusal(terms.reason, terms.neededMsats, this.opts.policy);
      throw new RefundedError(refused.code, refused.message, money);
    }
    return record;
  }

  /** Steps 3: the lease was given (`leaseApplied`) or not; refunds what is owed. Never throws. */
  async finish(record: PaymentRecord, leaseApplied: boolean, failure?: { code: string; message: string }): Promise<Settlement> {
    const settled = settle(record, leaseApplied, failure);
    await this.opts.journal.put(settled).catch((err: Error) => this.opts.logger.error({ ref: record.ref, err: err.message }, 'could not journal the settlement'));
    return this.refund(settled);
  }

  /**
   * A paid workload that never booted: everything its lease holds is owed
   * back. Journaled (so a crash cannot lose it) before the caller destroys
   * the workload; `refundOwed` then makes the refund.
   */
  async owe(ctx: ChargeContext, paid: { mint: string; unit: 'sat' | 'msat'; msats: number }, failure: { code: string; message: string }): Promise<PaymentRecord> {
    const record: PaymentRecord = { ...ctx, ...paid, phase: 'failed', refundMsats: paid.msats, failure, createdAt: new Date().toISOString() };
    await this.opts.journal.put(record);
    return record;
  }

  /** True while the request `ref` has money to settle or an answer owed: its answer is this flow's to give. */
  holds(ref: string): boolean {
    return this.opts.journal.has(ref);
  }

  refundOwed(record: PaymentRecord): Promise<Settlement> {
    return this.refund(record);
  }

  /** Step 4: the reply is in the outbox. A refund still owed keeps the record for the next start. */
  async answered(ref: string, money: Settlement): Promise<void> {
    if (money.refundMsats > 0 && !money.refundToken) return;
    await this.opts.journal.done(ref).catch((err: Error) => this.opts.logger.error({ ref, err: err.message }, 'could not remove a payment record'));
  }

  private async refund(record: PaymentRecord): Promise<Settlement> {
    const paidMsats = record.msats ?? 0;
    const refundMsats = record.refundMsats ?? 0;
    if (nextStep(record) !== 'refund') return { paidMsats, refundMsats, ...(record.refundToken ? { refundToken: record.refundToken } : {}) };
    try {
      await this.opts.journal.put({ ...record, phase: 'refunding' });
      const refundToken = await this.opts.payments.refund(record.mint, refundMsats, record.ref, record.unit);
      // The wallet refunds in the unit paid, rounded down: what is below one sat cannot travel and stays.
      const given = refundToken ? (record.unit === 'sat' ? Math.floor(refundMsats / 1000) * 1000 : refundMsats) : 0;
      await this.opts.journal.put({ ...record, phase: 'refunded', refundMsats: given, ...(refundToken ? { refundToken } : {}) });
      this.opts.logger.info({ ref: record.ref, refundMsats: given }, 'refund made');
      return { paidMsats, refundMsats: given, ...(refundToken ? { refundToken } : {}) };
    } catch (err) {
      // The record stays `refunding`: the wallet's refund is idempotent per ref, so the next start finishes it.
      this.opts.logger.error({ ref: record.ref, refundMsats, err: (err as Error).message }, 'refund could not be made now; retried at the next start');
      return { paidMsats, refundMsats };
    }
  }

  /**
   * At start, after the wallet's own recovery: finish every record a killed
   * run left, and answer its consumer. `leaseApplied` tells whether the lease
   * holds the payment; `release` frees what a refunded record must no longer
   * hold, before the refund; `answer` builds and sends the reply.
   */
  async reconcile(
    leaseApplied: (record: PaymentRecord) => boolean,
    release: (record: PaymentRecord) => Promise<void>,
    answer: (record: PaymentRecord, money: Settlement) => Promise<void>,
  ): Promise<void> {
    const { records, broken } = this.opts.journal.leftovers();
    if (broken.length) this.opts.logger.error({ files: broken }, 'unreadable payment records left in place: check them by hand');
    for (let record of records) {
      const log = this.opts.logger.child({ ref: record.ref });
      try {
        if (nextStep(record) === 'redeem_again') {
          try {
            const received = await this.opts.payments.redeem(record.token ?? '', record.ref);
            record = { ...record, token: undefined, phase: 'redeemed', msats: received.msats };
          } catch (err) {
            const code = err instanceof PaymentError ? err.code : 'mint_error';
            if (!certainlyUntouched(err)) {
              log.warn({ code }, 'swap still in doubt; kept for the next start');
              continue;
            }
            // Never ours: the consumer is told the request failed, with nothing to refund.
            record = { ...record, token: undefined, phase: 'failed', msats: 0, refundMsats: 0, failure: { code, message: 'the payment was not taken' } };
          }
          // A spawn or top-up cut short by the restart never gave its lease.
          if (record.phase === 'redeemed') record = settle(record, false);
        } else if (nextStep(record) === 'settle') {
          record = settle(record, leaseApplied(record));
        }
        await this.opts.journal.put(record);
        await release(record);
        // A refund the mint cannot make now is still answered (owed, no token yet): the
        // consumer must not hear from anyone that nothing was kept. `answered` keeps the
        // record, and the next start sends the token.
        const money = await this.refund(record);
        await answer(record, money);
        await this.answered(record.ref, money);
        log.info({ phase: record.phase, refundMsats: money.refundMsats }, 'payment settled after restart');
      } catch (err) {
        log.error({ err: (err as Error).message }, 'could not settle a payment record; kept for the next start');
      }
    }
  }
}

/** The answer when the swap's outcome is unknown: the consumer must not think the token is still theirs, nor that it is lost. */
const IN_DOUBT_MESSAGE = 'the payment could not be completed and its outcome is not known yet; if the token was taken, the provider refunds it in a later reply after its next start';

function certainlyUntouched(err: unknown): boolean {
  return err instanceof PaymentError && (err.untouched || UNTOUCHED.has(err.code));
}

function refusal(reason: 'insufficient_payment' | 'at_maximum', neededMsats: number, policy: PricingPolicy): RequestError {
  return reason === 'insufficient_payment'
    ? new RequestError('insufficient_payment', `the token is worth less than ${policy.minimumSeconds} s of this plan (${neededMsats} msats after the mint's fees); it was not taken`)
    : new RequestError('invalid_request', `the lease is at its maximum of ${policy.maxLeaseSeconds} s; the token was not taken`);
}

function asRequestErrorOf(err: unknown): Error {
  if (err instanceof PaymentError) return new RequestError(err.code as ErrorCode, err.message);
  return err as Error;
}

function asRequestError(err: unknown): never {
  throw asRequestErrorOf(err);
}

