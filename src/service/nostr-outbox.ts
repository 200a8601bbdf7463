/**
 * Sends the agent's messages as encrypted DMs. A message no relay accepted is
 * not dropped: it is spooled to disk and retried with backoff until its
 * deadline, across agent restarts, so a relay outage (or a crash during one)
 * delays replies instead of losing them.
 */
import { randomUUID } from 'node:crypto';
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { Outbox, Route } from '../agent/agent.js';
import { sealDm } from '../nostr/dm.js';
import type { RelayPool } from '../nostr/relays.js';
import type { DmChannel, NostrEvent } from '../nostr/types.js';
import { readJsonRecords, writeFileAtomic } from '../util/atomic-file.js';
import type { Logger } from '../util/logger.js';

export interface NostrOutboxOptions {
  sk: Uint8Array;
  pool: RelayPool;
  logger: Logger;
  /** Folder for messages awaiting a relay's OK (created 0700). Without it, retries live in memory only. */
  spoolDir?: string;
  /** How long a message keeps being retried after it was first sent. Default 30 minutes. */
  retryForMs?: number;
}

/** A message on its way. Holds no secrets: replies never carry passwords or keys. */
interface Pending {
  id: string;
  route: Route;
  message: Record<string, unknown>;
  /** Unix ms after which the message is given up. */
  deadline: number;
  /**
   * The sealed event, made once: a retry publishes the very same event, so a
   * relay whose OK came late (or never) and the consumer see one message,
   * never a second copy under a new id.
   */
  event?: NostrEvent;
}

export class NostrOutbox implements Outbox {
  private readonly retries = new Set<NodeJS.Timeout>();
  private closed = false;

  constructor(private readonly opts: NostrOutboxOptions) {
    if (opts.spoolDir) mkdirSync(opts.spoolDir, { recursive: true, mode: 0o700 });
  }

  /**
   * First attempt now. Resolves when a relay accepted the message, or when it
   * was spooled for retries; rejects only when it can be neither sent nor kept.
   */
  async send(route: Route, message: Record<string, unknown>): Promise<void> {
    const pending: Pending = { id: randomUUID(), route, message, deadline: Date.now() + (this.opts.retryForMs ?? 30 * 60_000) };
    await this.attempt(pending, 0, false);
  }

  /** Retry what an earlier run spooled and could not deliver. Call once the pool is started. */
  resume(): number {
    const dir = this.opts.spoolDir;
    if (!dir) return 0;
    let resumed = 0;
    const { records, broken } = readJsonRecords(dir, (json) => json as Pending);
    // A torn write cannot happen (atomic), so what does not parse is foreign junk.
    for (const file of broken) rmSync(file, { force: true });
    for (const pending of records) {
      if (Date.now() > pending.deadline) {
        this.opts.logger.error({ to: pending.route.to, replyTo: pending.route.replyTo }, 'spooled message past its deadline dropped');
        this.unspool(pending);
        continue;
      }
      resumed++;
      this.attempt(pending, 0, true).catch(() => undefined);
    }
    if (resumed) this.opts.logger.info({ resumed }, 'resending messages no relay had accepted before the restart');
    return resumed;
  }

  private async attempt(p: Pending, n: number, spooled: boolean): Promise<void> {
    const { route } = p;
    const channel: DmChannel = route.channel === 'nip04' ? 'nip04' : 'nip17';
    // A fresh seal per attempt: same content, new event; the consumer matches on request_id.
    const event = (p.event ??= sealDm({ sk: this.opts.sk, recipient: route.to, content: JSON.stringify(p.message), channel, replyTo: route.replyTo }));
    try {
      const res = await this.opts.pool.publish(event);
      if (spooled) this.unspool(p);
      this.opts.logger.debug({ to: route.to, replyTo: route.replyTo, accepted: res.accepted.length }, 'message published');
      return;
    } catch (err) {
      const delay = Math.min(30_000, 1000 * 2 ** n);
      if (Date.now() + delay > p.deadline) {
        this.opts.logger.error({ to: route.to, replyTo: route.replyTo }, 'message dropped: no relay accepted it before its deadline');
        if (spooled) this.unspool(p);
        throw err;
      }
      if (!spooled && this.opts.spoolDir) {
        writeFileAtomic(this.spoolFile(p), JSON.stringify(p));
        spooled = true;
      }
      if (this.closed) {
        // Shutting down: the spool file carries it into the next run.
        if (!spooled) throw err;
        return;
      }
      this.opts.logger.warn({ to: route.to, replyTo: route.replyTo, retryInMs: delay }, 'no relay accepted the message; will retry');
      const timer = setTimeout(() => {
        this.retries.delete(timer);
        this.attempt(p, n + 1, spooled).catch(() => undefined);
      }, delay);
      this.retries.add(timer);
    }
  }

  private spoolFile(p: Pending): string {
    return join(this.opts.spoolDir!, `${p.id}.json`);
  }

  private unspool(p: Pending): void {
    if (this.opts.spoolDir) rmSync(this.spoolFile(p), { force: true });
  }

  close(): void {
    this.closed = true;
    for (const t of this.retries) clearTimeout(t);
    this.retries.clear();
  }
}
