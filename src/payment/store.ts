/**
 * The provider's wallet on disk, under `<stateDir>/wallet/` (0700): proofs
 * are money, kept like leases — one JSON file per mint and unit, written
 * atomically (temp file, fsync, rename, fsync the folder), mode 0600. Beside
 * them: the NUT-13 counters, the journal of swaps under way, and the records
 * of what was received, refunded and withdrawn. Holds no key; the proofs'
 * secrets are bearer money, hence 0600 and a 0700 folder.
 *
 * One writer at a time across processes (the service and `paygress-agent
 * wallet …`): every change happens under `lock()`, and every reader under it
 * reads the files afresh.
 */
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import { open, readFile, rm, stat, unlink } from 'node:fs/promises';
import { createHash, randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { z } from 'zod';
import { readJsonRecords, writeFileAtomicAsync } from '../util/atomic-file.js';
import { PaymentError } from './types.js';

export const REF_PATTERN = /^[A-Za-z0-9._:-]{1,128}$/;

export const StoredProofSchema = z.object({
  id: z.string(),
  amount: z.number().int().positive(),
  secret: z.string(),
  C: z.string(),
});
export type StoredProof = z.infer<typeof StoredProofSchema>;

const UnitSchema = z.enum(['sat', 'msat']);

const PurseSchema = z.object({ mint: z.string(), unit: UnitSchema, proofs: z.array(StoredProofSchema) });
export type Purse = z.infer<typeof PurseSchema>;

/** A swap sent to a mint whose outcome is not yet saved: enough to find out and restore its outputs. */
export const PendingSwapSchema = z.object({
  id: z.string(),
  kind: z.enum(['redeem', 'refund', 'withdraw']),
  ref: z.string().optional(),
  mint: z.string(),
  unit: UnitSchema,
  /** The NUT-13 counters its outputs were derived from: NUT-09 restore asks the mint for exactly these. */
  counters: z.array(z.object({ keysetId: z.string(), start: z.number().int().min(0), count: z.number().int().min(0) })),
  /** The proofs given to the mint: the consumer's for a redeem, the wallet's own otherwise. */
  inputs: z.array(StoredProofSchema),
  createdAt: z.string(),
});
export type PendingSwap = z.infer<typeof PendingSwapSchema>;

export const ReceivedSchema = z.object({ ref: z.string(), mint: z.string(), unit: UnitSchema, msats: z.number().int().min(0), at: z.string() });
export type ReceivedRecord = z.infer<typeof ReceivedSchema>;

/** A token handed out (refund or withdrawal): its proofs left the wallet when this record was written. */
export const IssuedSchema = z.object({
  ref: z.string(),
  mint: z.string(),
  unit: UnitSchema,
  amount: z.number().int().min(0),
  token: z.string(),
  secrets: z.array(z.string()),
  at: z.string(),
});
export type IssuedRecord = z.infer<typeof IssuedSchema>;

const CountersSchema = z.record(z.string(), z.number().int().min(0));

const LOCK_POLL_MS = 25;
const LOCK_WAIT_MS = 60_000;
/** An empty lock file older than this was left by a crash between creating and writing it. */
const LOCK_EMPTY_STALE_MS = 2_000;

export class WalletStore {
  readonly dir: string;
  private readonly dirs: Record<'proofs' | 'swaps' | 'received' | 'refunds' | 'withdrawals' | 'mints', string>;
  private chain: Promise<unknown> = Promise.resolve();

  constructor(stateDir: string) {
    this.dir = join(stateDir, 'wallet');
    this.dirs = {
      proofs: join(this.dir, 'proofs'),
      swaps: join(this.dir, 'swaps'),
      received: join(this.dir, 'received'),
      refunds: join(this.dir, 'refunds'),
      withdrawals: join(this.dir, 'withdrawals'),
      mints: join(this.dir, 'mints'),
    };
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    for (const d of Object.values(this.dirs)) mkdirSync(d, { recursive: true, mode: 0o700 });
  }

  /**
   * Run `fn` as the wallet's only writer: one at a time in this process (a
   * promise chain) and across processes (an O_EXCL lock file holding the pid;
   * a lock whose process is gone is taken over).
   */
  async lock<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.chain.then(async () => {
      const release = await this.acquireFileLock();
      try {
        return await fn();
      } finally {
        await release();
      }
    });
    this.chain = run.catch(() => undefined);
    return run;
  }

  private async acquireFileLock(): Promise<() => Promise<void>> {
    const path = join(this.dir, 'lock');
    const deadline = Date.now() + LOCK_WAIT_MS;
    for (;;) {
      let created = false;
      try {
        const fh = await open(path, 'wx', 0o600);
        created = true;
        try {
          await fh.writeFile(`${process.pid}\n`);
        } finally {
          await fh.close();
        }
        return () => unlink(path).catch(() => undefined);
      } catch (err) {
        // Created but not written (a full disk): an empty lock would look
        // held by nobody we could check, so it goes before the error does.
        if (created) await rm(path, { force: true });
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      }
      const text = await readFile(path, 'utf8').catch(() => undefined);
      const owner = Number.parseInt(text ?? '', 10);
      // Our own pid in the file can only be a leftover of an earlier process
      // (this process takes the file lock one holder at a time). A file with
      // no pid is what a crash between creating and writing it leaves; its
      // creator writes the pid at once, so one still empty after a moment is stale.
      const stale =
        (Number.isInteger(owner) && owner > 0 && (owner === process.pid || !processAlive(owner))) ||
        (text !== undefined && text.trim() === '' && (await olderThan(path, LOCK_EMPTY_STALE_MS)));
      if (stale) {
        await rm(path, { force: true });
        continue;
      }
      if (Date.now() > deadline) throw new PaymentError('mint_error', 'the wallet is busy (another process holds its lock)');
      await new Promise((resolve) => setTimeout(resolve, LOCK_POLL_MS));
    }
  }

  // --- proofs -------------------------------------------------------------

  purses(): Purse[] {
    return readJsonRecords(this.dirs.proofs, (json) => PurseSchema.parse(json)).records;
  }

  purse(mint: string, unit: 'sat' | 'msat'): Purse {
    const path = this.pursePath(mint, unit);
    try {
      return PurseSchema.parse(JSON.parse(readFileSync(path, 'utf8')));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { mint, unit, proofs: [] };
      throw err;
    }
  }

  /** Add `add` (skipping secrets already held) and drop the proofs whose secrets are in `remove`. */
  async updatePurse(mint: string, unit: 'sat' | 'msat', change: { add?: StoredProof[]; remove?: Iterable<string> }): Promise<Purse> {
    const purse = this.purse(mint, unit);
    const removed = new Set(change.remove ?? []);
    const kept = purse.proofs.filter((p) => !removed.has(p.secret));
    const held = new Set(kept.map((p) => p.secret));
    for (const p of change.add ?? []) {
      if (held.has(p.secret) || removed.has(p.secret)) continue;
      held.add(p.secret);
      kept.push(p);
    }
    const next = { mint, unit, proofs: kept };
    await writeFileAtomicAsync(this.pursePath(mint, unit), `${JSON.stringify(next)}\n`);
    return next;
  }

  private pursePath(mint: string, unit: string): string {
    return join(this.dirs.proofs, `${mintKey(mint)}-${unit}.json`);
  }

  // --- NUT-13 counters ----------------------------------------------------

  counters(): Record<string, number> {
    try {
      return CountersSchema.parse(JSON.parse(readFileSync(join(this.dir, 'counters.json'), 'utf8')));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return {};
      throw err;
    }
  }

  /** Reserve `count` counters of a keyset: durable before they are used, so no output is ever derived twice. */
  async reserveCounters(keysetId: string, count: number, atLeast = 0): Promise<number> {
    const all = this.counters();
    const start = Math.max(all[keysetId] ?? 0, atLeast);
    all[keysetId] = start + count;
    await writeFileAtomicAsync(join(this.dir, 'counters.json'), `${JSON.stringify(all)}\n`);
    return start;
  }

  // --- swaps under way ----------------------------------------------------

  pendingSwaps(): PendingSwap[] {
    return readJsonRecords(this.dirs.swaps, (json) => PendingSwapSchema.parse(json)).records;
  }

  async putPendingSwap(swap: PendingSwap): Promise<void> {
    await writeFileAtomicAsync(join(this.dirs.swaps, `${swap.id}.json`), `${JSON.stringify(swap)}\n`);
  }

  async deletePendingSwap(id: string): Promise<void> {
    await rm(join(this.dirs.swaps, `${id}.json`), { force: true });
  }

  // --- records ------------------------------------------------------------

  received(ref: string): ReceivedRecord | undefined {
    return readRecord(join(this.dirs.received, `${ref}.json`), ReceivedSchema);
  }

  async putReceived(record: ReceivedRecord): Promise<void> {
    await writeFileAtomicAsync(join(this.dirs.received, `${record.ref}.json`), `${JSON.stringify(record)}\n`);
  }

  refund(ref: string): IssuedRecord | undefined {
    return readRecord(join(this.dirs.refunds, `${ref}.json`), IssuedSchema);
  }

  /** Write a token handed out; resolves once it is durable. Refunds are named by their ref, withdrawals by time. */
  async putIssued(kind: 'refund' | 'withdraw', record: IssuedRecord): Promise<string> {
    const path = join(kind === 'refund' ? this.dirs.refunds : this.dirs.withdrawals, `${record.ref}.json`);
    await writeFileAtomicAsync(path, `${JSON.stringify(record, null, 2)}\n`);
    return path;
  }

  /** Every secret that left in a refund or withdrawal token: never to be counted in the wallet again. */
  issuedSecrets(): Set<string> {
    const secrets = new Set<string>();
    for (const dir of [this.dirs.refunds, this.dirs.withdrawals]) {
      for (const r of readJsonRecords(dir, (json) => IssuedSchema.parse(json)).records) for (const s of r.secrets) secrets.add(s);
    }
    return secrets;
  }

  /** Drop records of received payments older than `maxAgeMs`: they only serve retries right after a crash. */
  pruneReceived(maxAgeMs: number): void {
    const cutoff = Date.now() - maxAgeMs;
    for (const r of readJsonRecords(this.dirs.received, (json) => ReceivedSchema.parse(json)).records) {
      if (Date.parse(r.at) < cutoff) rmSync(join(this.dirs.received, `${r.ref}.json`), { force: true });
    }
  }

  // --- mint metadata cache (keysets, fees, info) ---------------------------

  mintCache(mint: string): unknown {
    try {
      return JSON.parse(readFileSync(join(this.dirs.mints, `${mintKey(mint)}.json`), 'utf8'));
    } catch {
      return undefined;
    }
  }

  async putMintCache(mint: string, data: unknown): Promise<void> {
    await writeFileAtomicAsync(join(this.dirs.mints, `${mintKey(mint)}.json`), `${JSON.stringify(data)}\n`);
  }

  /** A fresh id for a swap record or a withdrawal: sortable by time. */
  static newId(prefix: string): string {
    return `${prefix}-${new Date().toISOString().replace(/[:.]/g, '')}-${randomBytes(4).toString('hex')}`;
  }
}

export function mintKey(mint: string): string {
  return createHash('sha256').update(mint).digest('hex').slice(0, 16);
}

function readRecord<T>(path: string, schema: z.ZodType<T>): T | undefined {
  try {
    return schema.parse(JSON.parse(readFileSync(path, 'utf8')));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

async function olderThan(path: string, ms: number): Promise<boolean> {
  const st = await stat(path).catch(() => undefined);
  return st !== undefined && Date.now() - st.mtimeMs > ms;
}
