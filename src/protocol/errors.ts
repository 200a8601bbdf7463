/**
 * Stable error codes of protocol v1. Clients switch on these; never rename one.
 * The human `message` that travels with a code may change freely.
 */
export const ERROR_CODES = [
  'invalid_request', // not JSON, too large, unknown type, bad or missing fields
  'unknown_plan', // the plan id is not offered by this provider
  'exceeds_plan', // explicit resources above the chosen plan's limits
  'isolation_unavailable', // no offered tier meets the requested minimum
  'not_found', // no such workload for this sender (also when it exists but belongs to someone else)
  'capacity_exhausted', // no port, RAM or CPU left on this host
  'spawn_failed', // the driver could not start the workload
  'rate_limited', // this sender is over its request rate
  'quota_exceeded', // this sender already holds its maximum of live workloads
  'busy', // too many spawns in flight, or too many requests waiting; try again shortly
  'clock_skew', // the request is dated more than a few minutes in the future (the sender's clock is ahead)
  'internal_error', // a bug or an unexpected host failure
  'not_allowed', // admission is by allowlist and this key is not on it
  'payment_required', // this provider charges and the request carries no cashu_token
  // Payment codes: upstream Paygress's `error_type` names, unchanged.
  'invalid_token', // not a cashuA/cashuB token, or malformed
  'token_already_spent', // the mint says the token's proofs are spent
  'token_pending', // the mint says the proofs are in a pending operation; try again later
  'non_whitelisted_mint', // the token's mint is not one this provider accepts (the offer lists them)
  'insufficient_payment', // worth less than the plan's minimum duration
  'unsupported_unit', // the token's unit is neither sat nor msat
  'mint_network_error', // the mint could not be reached; the token is still the consumer's
  'mint_error', // the mint refused the swap for another reason
] as const;

export type ErrorCode = (typeof ERROR_CODES)[number];

/** An error that is meant to reach the consumer as an `error` reply. */
export class RequestError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'RequestError';
  }
}
