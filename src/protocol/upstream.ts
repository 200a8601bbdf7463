/**
 * Compatibility with the upstream Paygress client (Rust). Its requests carry
 * no `type`: the shape decides (serde `untagged`). This adapter recognises
 * those shapes, turns them into v1 requests, and maps v1 replies back to the
 * upstream field names, keeping the v1 fields beside them so either kind of
 * client can read the same reply. Pure.
 *
 * Decisions (documented in docs/protocol.md "Upstream compatibility"):
 * - `cashu_token` → v1 `cashu_token` (spawn and top-up); never logged or echoed.
 * - `pod_spec_id` → v1 `plan` (absent → the provider's default plan).
 * - `ssh_password` → v1 `root_password` (same rules: 12-256 printable characters).
 * - `ssh_username` is not used: the guest's login user is always `root`, which
 *   the reply says (`instructions`, status `ssh_username`).
 * - `pod_image` is ignored: a VM provider boots its own configured base image.
 * - `template_slug` is refused: this provider has no template registry.
 * - top-up (`{pod_npub, cashu_token}`) → v1 `topup`; a provider that does not
 *   charge refuses it (`topup_not_supported`).
 * - every error reply carries upstream's `error_type` (see replies.ts), and
 *   workloads spawned by an upstream-shaped request get no v1-only notices.
 * - `pod_npub` in replies is `container-<workload id>`; status accepts it or the bare id.
 */
import { RequestError, type ErrorCode } from './errors.js';
import type { Reply } from './replies.js';
import { readRequestBody, validateRequest, WORKLOAD_ID_PATTERN, type ParseResult } from './requests.js';

/** How a request was shaped; its replies and its workload's later notices keep that shape. */
export type Dialect = 'v1' | 'upstream';

export type UpstreamKind = 'spawn' | 'status' | 'topup';
export type ParsedAny = ParseResult & ({ dialect: 'v1' } | { dialect: 'upstream'; kind: UpstreamKind });

const POD_PREFIX = 'container-';

export function podIdOf(workloadId: string): string {
  return `${POD_PREFIX}${workloadId}`;
}

/** `container-w-…` or a bare workload id → the workload id; anything else → null. */
export function workloadIdOfPod(podId: string): string | null {
  const id = podId.startsWith(POD_PREFIX) ? podId.slice(POD_PREFIX.length) : podId;
  return WORKLOAD_ID_PATTERN.test(id) ? id : null;
}

/** Which upstream request a parsed JSON body is, or null when it is not upstream-shaped (it has a `type`, or none of the keys). */
export function upstreamKind(body: unknown): UpstreamKind | null {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return null;
  const has = (k: string) => Object.hasOwn(body, k);
  if (has('type')) return null;
  // The same precedence as upstream's untagged enum: Spawn, then TopUp, then Status.
  if (has('ssh_password') || has('pod_spec_id') || has('pod_image')) return 'spawn';
  if (has('pod_npub') && has('cashu_token')) return 'topup';
  if (has('pod_id')) return 'status';
  return null;
}

/** v1 field names in validation messages → the upstream names the sender used. */
function renameFields(err: RequestError): RequestError {
  const msg = err.message.replace(/"root_password"/g, '"ssh_password"').replace(/"plan"/g, '"pod_spec_id"');
  return new RequestError(err.code, msg);
}

function refuse(code: ErrorCode, message: string): ParseResult {
  return { ok: false, error: new RequestError(code, message) };
}

function fromUpstream(kind: UpstreamKind, body: Record<string, unknown>): ParseResult {
  switch (kind) {
    case 'topup': {
      if (typeof body.pod_npub !== 'string') return refuse('invalid_request', 'field "pod_npub": must be a string');
      const id = workloadIdOfPod(body.pod_npub);
      if (!id) return refuse('not_found', 'no such pod for this key');
      return validateRequest({ type: 'topup', version: 1, workload_id: id, cashu_token: body.cashu_token });
    }
    case 'status': {
      if (typeof body.pod_id !== 'string') return refuse('invalid_request', 'field "pod_id": must be a string');
      const id = workloadIdOfPod(body.pod_id);
      // Same answer as v1 for someone else's or a nonexistent workload: no hint either way.
      if (!id) return refuse('not_found', 'no such pod for this key');
      return validateRequest({ type: 'status', workload_id: id });
    }
    case 'spawn': {
      if (body.template_slug !== undefined && body.template_slug !== null) {
        return refuse('invalid_request', 'field "template_slug": templates are not offered by this provider');
      }
      const v1: Record<string, unknown> = { type: 'spawn', version: 1 };
      if (body.ssh_password !== undefined) v1.root_password = body.ssh_password;
      if (body.pod_spec_id !== undefined && body.pod_spec_id !== null) v1.plan = body.pod_spec_id;
      if (body.cashu_token !== undefined && body.cashu_token !== null && body.cashu_token !== '') v1.cashu_token = body.cashu_token;
      const parsed = validateRequest(v1);
      return parsed.ok ? parsed : { ok: false, error: renameFields(parsed.error) };
    }
  }
}

/**
 * Parse one DM's plaintext as a v1 request or an upstream-shaped one. Total:
 * never throws. The dialect tells the caller which reply shape to use.
 */
export function parseAnyRequest(content: string, maxBytes: number): ParsedAny {
  const read = readRequestBody(content, maxBytes);
  if (!read.ok) return { dialect: 'v1', ...read };
  const kind = upstreamKind(read.body);
  if (kind) return { dialect: 'upstream', kind, ...fromUpstream(kind, read.body as Record<string, unknown>) };
  return { dialect: 'v1', ...validateRequest(read.body) };
}

export interface UpstreamContext {
  kind: UpstreamKind | undefined;
  /** Plan descriptions for `pod_spec_description`. */
  plans: ReadonlyArray<{ id: string; description: string }>;
}

/** Upstream's error kinds where they have one; otherwise the v1 code. */
export function upstreamErrorType(code: ErrorCode, kind: UpstreamKind | undefined): string {
  if (kind === 'topup' && code === 'payment_required') return 'topup_not_supported';
  if (code === 'unknown_plan' || code === 'exceeds_plan') return 'invalid_spec';
  return code;
}

/**
 * A v1 reply with the upstream fields added. The v1 fields stay: upstream's
 * client ignores unknown fields, and v1 clients keep matching on `type` and
 * `request_id`. Replies without an upstream counterpart pass unchanged.
 */
export function toUpstreamReply(reply: Reply, ctx: UpstreamContext): Reply & Record<string, unknown> {
  switch (reply.type) {
    case 'access_details': {
      const podId = podIdOf(reply.workload_id);
      return {
        ...reply,
        pod_npub: podId,
        node_port: reply.ssh_port,
        cpu_millicores: reply.plan.vcpus * 1000,
        memory_mb: reply.plan.memory_mb,
        pod_spec_name: reply.plan.name,
        pod_spec_description: ctx.plans.find((p) => p.id === reply.plan.id)?.description ?? '',
        instructions: [
          `ssh -p ${reply.ssh_port} root@${reply.host}`,
          'Log in as root with the ssh_password you sent (ssh_username is not used by this provider).',
          `The VM is deleted at ${reply.expires_at}.`,
          `Status: send {"pod_id": "${podId}"}.`,
        ],
        host_address: reply.host,
      };
    }
    case 'status':
      return {
        ...reply,
        pod_id: podIdOf(reply.workload_id),
        status: reply.state,
        time_remaining_seconds: reply.seconds_left,
        cpu_millicores: reply.plan.vcpus * 1000,
        memory_mb: reply.plan.memory_mb,
        ssh_host: reply.host,
        ssh_username: 'root',
      };
    case 'error':
      return { ...reply, error_type: upstreamErrorType(reply.code, ctx.kind), details: null };
    case 'topped_up':
      return {
        ...reply,
        success: true,
        pod_npub: podIdOf(reply.workload_id),
        extended_duration_seconds: reply.extended_seconds,
        new_expires_at: reply.expires_at,
        message: `extended by ${reply.extended_seconds} s; the VM is deleted at ${reply.expires_at}`,
      };
    default:
      return reply as Reply & Record<string, unknown>;
  }
}
