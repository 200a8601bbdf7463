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
  'shutting_down', // the agent is stopping and takes no new work
  'internal_error', // a bug or an unexpected host failure
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
