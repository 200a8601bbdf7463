/**
 * Leases: who owns which workload, on what terms, until when. One JSON file
 * per workload under `<stateDir>/leases/`, written atomically with mode 0600,
 * so a restarted agent knows every owner. Holds no secrets.
 */
import { mkdirSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { z } from 'zod';
import { ISOLATION_LEVELS } from '../protocol/isolation.js';
import { WORKLOAD_ID_PATTERN } from '../protocol/requests.js';
import { HEX64 } from '../util/hex.js';
import { KeyedTurns } from '../util/keyed-turns.js';
import { readJsonRecords, writeFileAtomicAsync } from '../util/atomic-file.js';

export const LeaseSchema = z.object({
  workloadId: z.string().regex(WORKLOAD_ID_PATTERN),
  /** Hex pubkey of the key that spawned it: the only key that may stop it or read its status. */
  owner: z.string().regex(HEX64),
  requestId: z.string(),
  /** Transport channel the owner used; unprompted notices (expiry) go back on it. */
  channel: z.string(),
  isolationLevel: z.enum(ISOLATION_LEVELS),
  driver: z.string(),
  planId: z.string(),
  planName: z.string(),
  vcpus: z.number().int(),
  memoryMb: z.number().int(),
  diskGb: z.number().int(),
  sshPort: z.number().int(),
  createdAt: z.string(),
  expiresAt: z.string(),
  /** When the owner was told the guest is ready; absent while it boots (a restart resumes the watch). */
  readyAt: z.string().optional(),
  /** `upstream`: spawned by an upstream-shaped request, whose client takes any DM for its reply: no v1-only notices. */
  dialect: z.enum(['v1', 'upstream']).optional(),
  /** Top-ups already applied (request ids, the latest few): a restart must not apply or refund one twice. */
  paidRefs: z.array(z.string()).max(16).optional(),
  /** What the lease holds of the owner's money (surplus already refunded): given back in full if the guest never boots. */
  paid: z.object({ mint: z.string(), unit: z.enum(['sat', 'msat']), msats: z.number().int().min(0) }).optional(),
});

export type Lease = z.infer<typeof LeaseSchema>;

export class LeaseStore {
  private readonly dir: string;
  private readonly leases = new Map<string, Lease>();
  /**
   * The last write of each lease still under way. Writes of one lease run in
   * the order they were asked for: a delete asked for while a put is writing
   * would otherwise be undone when the put's rename lands after it.
   */
  private readonly turns = new KeyedTurns();

  constructor(stateDir: string) {
    this.dir = join(stateDir, 'leases');
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
  }

  /** Read every lease file; unreadable ones are returned by name so the caller can report them. */
  load(): { loaded: number; broken: string[] } {
    const { records, broken } = readJsonRecords(this.dir, (json) => LeaseSchema.parse(json));
    for (const lease of records) this.leases.set(lease.workloadId, lease);
    return { loaded: this.leases.size, broken: broken.map((file) => basename(file)) };
  }

  get(id: string): Lease | undefined {
    return this.leases.get(id);
  }

  all(): Lease[] {
    return [...this.leases.values()];
  }

  /** Whether `owner` holds a lease; no copy of the list (asked for every inbound message). */
  hasOwner(owner: string): boolean {
    for (const lease of this.leases.values()) if (lease.owner === owner) return true;
    return false;
  }

  /** Resolves once the lease is on disk (fsynced); only then does `get` return it. */
  put(lease: Lease): Promise<void> {
    return this.turns.run(lease.workloadId, () => this.write(lease));
  }

  /**
   * Change a lease that still exists when its turn to be written comes; a
   * no-op once it was deleted, so a late change cannot bring a stopped
   * workload's lease back.
   */
  update(id: string, change: (lease: Lease) => Lease): Promise<void> {
    return this.turns.run(id, async () => {
      const current = this.leases.get(id);
      if (current) await this.write(change(current));
    });
  }

  delete(id: string): Promise<void> {
    return this.turns.run(id, async () => {
      await rm(join(this.dir, `${id}.json`), { force: true });
      this.leases.delete(id);
    });
  }

  private async write(lease: Lease): Promise<void> {
    await writeFileAtomicAsync(join(this.dir, `${lease.workloadId}.json`), `${JSON.stringify(lease, null, 2)}\n`);
    this.leases.set(lease.workloadId, lease);
  }
}

/** Whole seconds until the lease ends; 0 once it has. */
export function secondsLeft(lease: Pick<Lease, 'expiresAt'>, now = Date.now()): number {
  return Math.max(0, Math.floor((Date.parse(lease.expiresAt) - now) / 1000));
}
