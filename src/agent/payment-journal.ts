/**
 * The payment journal: one record per paid request (spawn or top-up), written
 * before the token is swapped and removed only once the consumer's answer is
 * handed to the outbox. Each step of the money's way is a phase, on disk
 * (atomic 0600 file, fsync) before the step after it starts:
 *
 *   quoted ─► redeemed(msats) ─► leased ─┬─────────────────────► (answered: record removed)
 *                             └► failed ─┴► refunding ─► refunded(token) ─┘
 *
 * so after a SIGKILL anywhere the next start knows where the money is: still
 * the consumer's (quoted, never swapped), in the wallet for a lease given, or
 * owed back (refunding → a refund token). `nextStep` is that decision, pure.
 */
import { existsSync, mkdirSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { WORKLOAD_ID_PATTERN } from '../protocol/requests.js';
import { HEX64 } from '../util/hex.js';
import { readJsonRecords, writeFileAtomicAsync } from '../util/atomic-file.js';

/** A request id, or `<request id>.boot` for the refund of a paid workload that never booted. */
const isRef = (ref: string): boolean => HEX64.test(ref.endsWith('.boot') ? ref.slice(0, -'.boot'.length) : ref);

export const PaymentRecordSchema = z.object({
  /** The request's id; also the `ref` handed to the wallet for its swap and refund. */
  ref: z.string().refine(isRef),
  kind: z.enum(['spawn', 'topup']),
  sender: z.string().regex(HEX64),
  channel: z.string(),
  dialect: z.enum(['v1', 'upstream']),
  /** The workload this payment is for (a spawn's id is chosen before the swap). */
  workloadId: z.string().regex(WORKLOAD_ID_PATTERN),
  mint: z.string(),
  /** The unit the consumer paid in; a refund goes back in it. */
  unit: z.enum(['sat', 'msat']),
  phase: z.enum(['quoted', 'redeemed', 'leased', 'failed', 'refunding', 'refunded']),
  /**
   * The consumer's token, kept only while its swap may be in doubt (phase
   * `quoted`): after a crash mid-swap the swap is retried by ref. Dropped at `redeemed`.
   */
  token: z.string().optional(),
  /** What the swap put into the wallet. */
  msats: z.number().int().min(0).optional(),
  /** Lease seconds the payment buys (after the cap). */
  seconds: z.number().int().min(0).optional(),
  /** What goes back to the consumer: the cap's surplus when leased, everything when failed. */
  refundMsats: z.number().int().min(0).optional(),
  refundToken: z.string().optional(),
  /** Why the request failed after the swap (the error reply's code and message). */
  failure: z.object({ code: z.string(), message: z.string() }).optional(),
  createdAt: z.string(),
});
export type PaymentRecord = z.infer<typeof PaymentRecordSchema>;

export type Step =
  /** Swap state unknown (crash or unclear mint error mid-swap): swap again by ref, then treat as failed. */
  | 'redeem_again'
  /** Swapped; whether the lease exists decides leased or failed. */
  | 'settle'
  /** A refund is owed and not yet made. */
  | 'refund'
  /** Nothing owed: send the answer, then drop the record. */
  | 'answer';

/** The next thing to do for a record, whether live or found at start. Pure. */
export function nextStep(record: PaymentRecord): Step {
  switch (record.phase) {
    case 'quoted':
      return 'redeem_again';
    case 'redeemed':
      return 'settle';
    case 'leased':
    case 'failed':
      return (record.refundMsats ?? 0) > 0 ? 'refund' : 'answer';
    case 'refunding':
      return 'refund';
    case 'refunded':
      return 'answer';
  }
}

/**
 * Where a swapped payment ends up: `leaseApplied` says whether the lease it
 * paid for holds it (a spawn's lease exists, a top-up's extension was
 * written). Failed means all of it goes back. Pure.
 */
export function settle(record: PaymentRecord, leaseApplied: boolean, failure?: { code: string; message: string }): PaymentRecord {
  if (leaseApplied) return { ...record, phase: 'leased' };
  return {
    ...record,
    phase: 'failed',
    refundMsats: record.msats ?? 0,
    failure: failure ?? record.failure ?? { code: 'spawn_failed', message: 'the provider restarted during this request; your payment is refunded' },
  };
}

export class PaymentJournal {
  private readonly dir: string;

  constructor(stateDir: string) {
    this.dir = join(stateDir, 'payments');
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
  }

  /** Resolves once the record is on disk (fsynced): only then may the next money step start. */
  put(record: PaymentRecord): Promise<void> {
    return writeFileAtomicAsync(join(this.dir, `${record.ref}.json`), JSON.stringify(PaymentRecordSchema.parse(record)));
  }

  has(ref: string): boolean {
    return existsSync(join(this.dir, `${ref}.json`));
  }

  /** The consumer was answered: nothing is owed any more. */
  done(ref: string): Promise<void> {
    return rm(join(this.dir, `${ref}.json`), { force: true });
  }

  /** Records a previous run left; unreadable ones are reported, never removed (they may name money). */
  leftovers(): { records: PaymentRecord[]; broken: string[] } {
    return readJsonRecords(this.dir, (json) => PaymentRecordSchema.parse(json));
  }
}
