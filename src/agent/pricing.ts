/**
 * What a payment buys: msats in, lease seconds and the refund out. Pure and
 * integer-only (msats are whole numbers, a lease is whole seconds), so the
 * provider never keeps what it did not sell and never sells what it was not paid.
 */

export interface PricingPolicy {
  /** A payment must buy at least this long (upstream: 60 s); less is refused before the swap. */
  minimumSeconds: number;
  /** No lease (spawn, or remaining time after a top-up) runs longer; what would buy more is refunded. */
  maxLeaseSeconds: number;
}

/** The least a token must be worth, after the mint's fees, for a plan at `rateMsatsPerSec`. */
export function minimumMsats(rateMsatsPerSec: number, policy: PricingPolicy): number {
  return rateMsatsPerSec * policy.minimumSeconds;
}

export type Terms =
  | { ok: true; seconds: number; chargedMsats: number; refundMsats: number }
  | { ok: false; reason: 'insufficient_payment' | 'at_maximum'; neededMsats: number };

/**
 * Seconds bought by `paidMsats` at `rateMsatsPerSec`, capped at `capSeconds`
 * (the policy's maximum minus what the lease already holds); everything not
 * charged is refunded. A refund travels in whole units of the token
 * (`unitMsats`: 1000 for sat): what is left below one unit buys seconds
 * instead, even past the cap, so only less than one second's price is kept.
 * A rate of 0 is a free plan: it has no terms to compute and must not reach
 * here (callers take no payment for it).
 */
export function leaseTerms(paidMsats: number, rateMsatsPerSec: number, capSeconds: number, policy: PricingPolicy, unitMsats = 1): Terms {
  if (!Number.isSafeInteger(rateMsatsPerSec) || rateMsatsPerSec <= 0) throw new RangeError('a free plan has no lease terms');
  const paid = Math.max(0, Math.floor(paidMsats));
  if (capSeconds < policy.minimumSeconds) return { ok: false, reason: 'at_maximum', neededMsats: minimumMsats(rateMsatsPerSec, policy) };
  const bought = Math.floor(paid / rateMsatsPerSec);
  if (bought < policy.minimumSeconds) return { ok: false, reason: 'insufficient_payment', neededMsats: minimumMsats(rateMsatsPerSec, policy) };
  const capped = Math.min(bought, Math.floor(capSeconds));
  const surplus = paid - capped * rateMsatsPerSec;
  const refundMsats = surplus - (surplus % unitMsats);
  const seconds = capped + Math.floor((surplus - refundMsats) / rateMsatsPerSec);
  return { ok: true, seconds, chargedMsats: seconds * rateMsatsPerSec, refundMsats };
}

/** Seconds a top-up may still add to a lease with `secondsLeft` before it hits the maximum. */
export function topupCapSeconds(secondsLeft: number, policy: PricingPolicy): number {
  return Math.max(0, policy.maxLeaseSeconds - Math.max(0, secondsLeft));
}

/** The expiry after a top-up of `seconds`: from the current expiry, not from now (time already paid for is kept). */
export function extendedExpiry(currentExpiresAt: string, seconds: number, now = Date.now()): string {
  const from = Math.max(Date.parse(currentExpiresAt), now);
  return new Date(from + seconds * 1000).toISOString();
}
