/**
 * Protocol v1 requests: the JSON a consumer puts in an encrypted DM.
 * Pure: text in, a typed request or a RequestError out. Error messages name
 * fields of the schema only and never echo what the sender wrote.
 */
import { z } from 'zod';
import { ISOLATION_LEVELS } from './isolation.js';
import { RequestError } from './errors.js';
import { isValidSshPublicKey } from './ssh-key.js';

export const MAX_CONTENT_BYTES = 64 * 1024;
export const WORKLOAD_ID_PATTERN = /^w-[0-9a-f]{12}$/;
/** A plan id, in requests and in the config that defines the plans. */
export const PLAN_ID_PATTERN = /^[a-z0-9][a-z0-9-]{0,31}$/;

const version = z.literal(1).optional();
const workloadId = z.string().regex(WORKLOAD_ID_PATTERN, 'must be a workload id like w-0123456789ab');
/** Only its shape is checked here; what it is worth is the wallet's question. Never logged or echoed. */
const cashuToken = z.string().min(1).max(32_768, 'must be at most 32768 characters');

export const SpawnRequestSchema = z.object({
  type: z.literal('spawn'),
  version,
  // Only ever hashed (SHA-512 crypt) into the guest's seed; any printable text is safe.
  root_password: z
    .string()
    .min(12, 'must be at least 12 characters')
    .max(256, 'must be at most 256 characters')
    .refine((s) => !/[\u0000-\u001f\u007f]/.test(s), 'must not contain control characters'),
  plan: z.string().regex(PLAN_ID_PATTERN, 'must be a plan id').optional(),
  vcpus: z.number().int().min(1).max(256).optional(),
  memory_mb: z.number().int().min(64).max(1_048_576).optional(),
  disk_gb: z.number().int().min(1).max(65_536).optional(),
  isolation: z.enum(ISOLATION_LEVELS).optional(),
  ssh_keys: z.array(z.string().refine(isValidSshPublicKey, 'must be an OpenSSH public key line')).max(16).optional(),
  cashu_token: cashuToken.optional(),
});

export const StopRequestSchema = z.object({ type: z.literal('stop'), version, workload_id: workloadId });
export const StatusRequestSchema = z.object({ type: z.literal('status'), version, workload_id: workloadId });
/** Buys more time for a live workload of one's own; extends from the current expiry. */
export const TopupRequestSchema = z.object({ type: z.literal('topup'), version, workload_id: workloadId, cashu_token: cashuToken });

export type SpawnRequest = z.infer<typeof SpawnRequestSchema>;
export type StopRequest = z.infer<typeof StopRequestSchema>;
export type StatusRequest = z.infer<typeof StatusRequestSchema>;
export type TopupRequest = z.infer<typeof TopupRequestSchema>;
export type Request = SpawnRequest | StopRequest | StatusRequest | TopupRequest;

const SCHEMAS = { spawn: SpawnRequestSchema, stop: StopRequestSchema, status: StatusRequestSchema, topup: TopupRequestSchema } as const;
type RequestType = keyof typeof SCHEMAS;

export type ParseResult = { ok: true; request: Request } | { ok: false; error: RequestError };

type Refused = { ok: false; error: RequestError };

function fail(message: string): Refused {
  return { ok: false, error: new RequestError('invalid_request', message) };
}

/** Parse one DM's plaintext as a v1 request. Total: never throws. */
export function parseRequest(content: string, maxBytes = MAX_CONTENT_BYTES): ParseResult {
  const read = readRequestBody(content, maxBytes);
  return read.ok ? validateRequest(read.body) : read;
}

/** The size check and JSON.parse of a DM's plaintext, done once whatever dialect it turns out to be. Total. */
export function readRequestBody(content: string, maxBytes = MAX_CONTENT_BYTES): { ok: true; body: unknown } | Refused {
  if (Buffer.byteLength(content, 'utf8') > maxBytes) return fail(`request is larger than ${maxBytes} bytes`);
  try {
    return { ok: true, body: JSON.parse(content) as unknown };
  } catch {
    return fail('request is not valid JSON');
  }
}

/** A parsed JSON body checked as a v1 request. Total: never throws. */
export function validateRequest(body: unknown): ParseResult {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return fail('request must be a JSON object');
  const type = (body as { type?: unknown }).type;
  if (typeof type !== 'string' || !Object.hasOwn(SCHEMAS, type)) {
    return fail(`field "type" must be one of ${Object.keys(SCHEMAS).join(', ')}`);
  }
  const parsed = SCHEMAS[type as RequestType].safeParse(body);
  if (!parsed.success) return fail(describeIssues(parsed.error.issues));
  return { ok: true, request: parsed.data };
}

/**
 * Say which schema field is wrong and why, without the sender's values. Paths
 * hold schema keys and array indexes only: objects are not strict, so unknown
 * keys (which are sender text) never produce an issue.
 */
function describeIssues(issues: readonly z.core.$ZodIssue[]): string {
  return issues
    .slice(0, 5)
    .map((issue) => {
      const path = issue.path.map(String).join('.') || 'request';
      // zod's own messages state expectations and types, never the received value.
      return `field "${path}": ${issue.message}`;
    })
    .join('; ');
}
