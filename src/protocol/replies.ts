/**
 * Protocol v1 replies. Every reply names the request it answers (`request_id`).
 * Pure builders: the agent fills in facts, these fix the wire shape.
 */
import type { ErrorCode } from './errors.js';
import type { IsolationLevel } from './isolation.js';

export interface PlanInfo {
  id: string;
  name: string;
  vcpus: number;
  memory_mb: number;
  disk_gb: number;
}

export interface AccessDetails {
  type: 'access_details';
  version: 1;
  request_id: string;
  workload_id: string;
  host: string;
  ssh_port: number;
  ssh_user: 'root';
  isolation_level: IsolationLevel;
  expires_at: string;
  plan: PlanInfo;
}

/**
 * Money fields a reply to a paid request carries (access details, top-up,
 * error): what the wallet received and what goes back. `refund_token` is a
 * Cashu token the consumer's wallet redeems; absent when nothing is owed, or
 * when the refund could not be made yet (then `refund_msats` says how much is
 * still owed, and it follows in a later reply naming the same request).
 */
export interface PaymentFields {
  paid_msats?: number;
  refund_msats?: number;
  refund_token?: string;
}

/** A top-up went through: the lease now ends at `expires_at`. */
export interface ToppedUpReply extends PaymentFields {
  type: 'topped_up';
  version: 1;
  request_id: string;
  workload_id: string;
  extended_seconds: number;
  expires_at: string;
}

export interface StoppedReply {
  type: 'stopped';
  version: 1;
  request_id: string;
  workload_id: string;
}

export interface StatusReply {
  type: 'status';
  version: 1;
  request_id: string;
  workload_id: string;
  state: 'running' | 'gone';
  host: string;
  ssh_port: number;
  isolation_level: IsolationLevel;
  expires_at: string;
  seconds_left: number;
  plan: PlanInfo;
}

export interface ErrorReply extends PaymentFields {
  type: 'error';
  version: 1;
  request_id: string;
  code: ErrorCode;
  message: string;
  /**
   * The code again under upstream's name for it: upstream's client reads
   * `error_type`, and a reply sent before the request's shape is known (too
   * large, not JSON, rate limited) must still be readable by it.
   */
  error_type: string;
}

/**
 * Messages the provider sends unprompted about a workload. `request_id` is the
 * spawn request's, so a client still waiting on its spawn sees them too.
 */
export interface WorkloadNotice {
  type: 'expiring' | 'expired' | 'workload_lost';
  version: 1;
  request_id: string;
  workload_id: string;
  expires_at: string;
  seconds_left: number;
  message: string;
}

/** Follow-up to `access_details`: the guest accepts logins now. */
export interface ReadyNotice {
  type: 'ready';
  version: 1;
  request_id: string;
  workload_id: string;
  /** Time from access details to ready. */
  ms: number;
}

/** Follow-up to `access_details`: the guest never became ready; it was deleted. */
export interface BootFailedNotice extends PaymentFields {
  type: 'boot_failed';
  version: 1;
  request_id: string;
  workload_id: string;
  reason: 'died' | 'timeout';
  message: string;
  /** Last lines of the guest's serial console. */
  console: string;
}

export type Reply =
  | (AccessDetails & PaymentFields)
  | ReadyNotice
  | BootFailedNotice
  | StoppedReply
  | StatusReply
  | ErrorReply
  | WorkloadNotice
  | ToppedUpReply;

export function errorReply(requestId: string, code: ErrorCode, message: string): ErrorReply {
  return { type: 'error', version: 1, request_id: requestId, code, message, error_type: code };
}
