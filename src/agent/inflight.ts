/**
 * The spawn journal: a record written before a spawn touches the host and
 * removed once its reply is handed to the outbox. If the agent dies in between
 * (SIGKILL, power loss), the next start finds the record, releases whatever
 * the half-done spawn took, and still answers the consumer.
 */
import { mkdirSync, rmSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { WORKLOAD_ID_PATTERN } from '../protocol/requests.js';
import { HEX64 } from '../util/hex.js';
import { readJsonRecords, writeFileAtomicAsync } from '../util/atomic-file.js';

export const InflightSchema = z.object({
  requestId: z.string().regex(HEX64),
  sender: z.string().regex(HEX64),
  channel: z.string(),
  workloadId: z.string().regex(WORKLOAD_ID_PATTERN),
  driver: z.string(),
  startedAt: z.string(),
});
export type Inflight = z.infer<typeof InflightSchema>;

export class InflightJournal {
  private readonly dir: string;

  constructor(stateDir: string) {
    this.dir = join(stateDir, 'inflight');
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
  }

  /** Resolves once the record is on disk (fsynced): only then may the spawn touch the host. */
  begin(entry: Inflight): Promise<void> {
    return writeFileAtomicAsync(join(this.dir, `${entry.requestId}.json`), JSON.stringify(entry));
  }

  end(requestId: string): Promise<void> {
    return rm(join(this.dir, `${requestId}.json`), { force: true });
  }

  /** Entries left by a previous run; unreadable files are removed (they hold nothing we could act on). */
  leftovers(): Inflight[] {
    const { records, broken } = readJsonRecords(this.dir, (json) => InflightSchema.parse(json));
    for (const file of broken) rmSync(file, { force: true });
    return records;
  }
}
