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

/**
 * What a reply says about a workload, named as the agent's lease names it (a
 * lease fits structurally; the protocol does not import the agent's types).
 */
export interface WorkloadFacts {
  requestId: string;
  workloadId: string;
  sshPort: number;
  isolationLevel: IsolationLevel;
  expiresAt: string;
  planId: string;
  planName: string;
  vcpus: number;
  memoryMb: number;
  diskGb: number;
}

/** What the consumer learns about its money, as the payment flow settles it. */
export interface MoneyFacts {
  paidMsats: number;
  refundMsats: number;
  refundToken?: string;
}

export function paymentFields(money: MoneyFacts): PaymentFields {
  return {
    paid_msats: money.paidMsats,
    refund_msats: money.refundMsats,
    ...(money.refundToken ? { refund_token: money.refundToken } : {}),
  };
}

export function planInfo(w: WorkloadFacts): PlanInfo {
  return { id: w.planId, name: w.planName, vcpus: w.vcpus, memory_mb: w.memoryMb, disk_gb: w.diskGb };
}

export function accessDetailsReply(w: WorkloadFacts, host: string): AccessDetails {
  return {
    type: 'access_details',
    version: 1,
    request_id: w.requestId,
    workload_id: w.workloadId,
    host,
    ssh_port: w.sshPort,
    ssh_user: 'root',
    isolation_level: w.isolationLevel,
    expires_at: w.expiresAt,
    plan: planInfo(w),
  };
}

export function statusReply(requestId: string, w: WorkloadFacts, host: string, state: StatusReply['state'], secondsLeft: number): StatusReply {
  return {
    type: 'status',
    version: 1,
    request_id: requestId,
    workload_id: w.workloadId,
    state,
    host,
    ssh_port: w.sshPort,
    isolation_level: w.isolationLevel,
    expires_at: w.expiresAt,
    seconds_left: secondsLeft,
    plan: planInfo(w),
  };
}

export function stoppedReply(requestId: string, workloadId: string): StoppedReply {
  return { type: 'stopped', version: 1, request_id: requestId, workload_id: workloadId };
}

export function toppedUpReply(requestId: string, w: Pick<WorkloadFacts, 'workloadId' | 'expiresAt'>, extendedSeconds: number, money: MoneyFacts): ToppedUpReply {
  return {
    type: 'topped_up',
    version: 1,
    request_id: requestId,
    workload_id: w.workloadId,
    extended_seconds: extendedSeconds,
    expires_at: w.expiresAt,
    ...paymentFields(money),
  };
}

export function readyNotice(w: Pick<WorkloadFacts, 'requestId' | 'workloadId'>, ms: number): ReadyNotice {
  return { type: 'ready', version: 1, request_id: w.requestId, workload_id: w.workloadId, ms };
}

export function bootFailedNotice(
  w: Pick<WorkloadFacts, 'requestId' | 'workloadId'>,
  reason: BootFailedNotice['reason'],
  message: string,
  consoleTail: string,
  money?: MoneyFacts,
): BootFailedNotice {
  return {
    type: 'boot_failed',
    version: 1,
    request_id: w.requestId,
    workload_id: w.workloadId,
    reason,
    message,
    console: consoleTail,
    ...(money ? paymentFields(money) : {}),
  };
}

export function workloadNotice(w: Pick<WorkloadFacts, 'requestId' | 'workloadId' | 'expiresAt'>, type: WorkloadNotice['type'], message: string, secondsLeft: number): WorkloadNotice {
  return {
    type,
    version: 1,
    request_id: w.requestId,
    workload_id: w.workloadId,
    expires_at: w.expiresAt,
    seconds_left: secondsLeft,
    message,
  };
}

/** A reply with the money fields of a paid request added. */
export function withPayment<R extends Reply>(reply: R, money: MoneyFacts): R & PaymentFields {
  return { ...reply, ...paymentFields(money) };
}
