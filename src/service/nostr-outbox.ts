/**
 * Sends the agent's messages as encrypted DMs. A message no relay accepted is
 * not dropped: it is spooled to disk and retried with backoff until its
 * deadline, across agent restarts, so a relay outage (or a crash during one)
 * delays replies instead of losing them.
 *
 * The spool is bounded (messages and bytes): a long outage under a flood must
 * not fill the disk. Beyond the bound the oldest waiting message is dropped
 * first (its consumer has waited longest and most likely gave up), with an
 * error line naming it. A spool file that cannot be written (full disk) does
 * not lose the message: it is retried from memory, within the same bound.
 *
 * `send` resolves only once the message is safe: a relay accepted it, or it
 * is in the spool. Held in memory only (the spool could not be written), or
 * dropped at once to keep the bound, it rejects, though the memory copy keeps
 * being retried: a caller that ends a record on a resolved send (the payment
 * journal, for a reply with a refund) keeps it then, and the next start
 * answers again.
 *
 * A message carrying money (a `refund_token`) is never dropped: not to keep
 * the bound (it may exceed it; each one answers a payment in real tokens of a
 * whitelisted mint, so their number is bounded by what payers hold, not by
 * what a stranger can sign) and not at its deadline: it is retried until a
 * relay accepts it, across restarts. Its payment record ended when the spool
 * took it, so the spool is its only copy.
 *
 * The spool holds the sealed (encrypted) event, never the plaintext message:
 * a refund token is a bearer token, and the sealed event is all a retry needs.
 */
import { randomUUID } from 'node:crypto';
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { Outbox, Route } from '../agent/outbox.js';
import type { Reply } from '../protocol/replies.js';
import { sealDm } from '../nostr/dm.js';
import type { RelayPool } from '../nostr/relays.js';
import type { DmChannel, NostrEvent } from '../nostr/types.js';
import { readJsonRecords, writeFileAtomic } from '../util/atomic-file.js';
import type { Logger } from '../util/logger.js';

export interface NostrOutboxOptions {
  sk: Uint8Array;
  pool: RelayPool;
  logger: Logger;
  /** Folder for messages awaiting a relay's OK (created 0700). Without it, retries live in memory only and a send no relay accepted rejects. */
  spoolDir?: string;
  /** How long a message keeps being retried after it was first sent. Default 30 minutes. */
  retryForMs?: number;
  /** Most messages waiting for a relay's OK (spooled or held in memory). Default 1000. */
  maxWaiting?: number;
  /** Most bytes of waiting messages (their JSON). Default 8 MiB. */
  maxWaitingBytes?: number;
}

export const DEFAULT_MAX_WAITING = 1000;
export const DEFAULT_MAX_WAITING_BYTES = 8 * 1024 * 1024;

/** A message on its way, as spooled. No plaintext: the content exists only inside the sealed event. */
interface Pending {
  id: string;
  route: Route;
  /** Unix ms after which the message is given up (unless `keep`). */
  deadline: number;
  /**
   * The sealed event, made once: a retry publishes the very same event, so a
   * relay whose OK came late (or never) and the consumer see one message,
   * never a second copy under a new id.
   */
  event: NostrEvent;
  /** Carries money: never dropped, neither to keep the bound nor at the deadline. */
  keep?: boolean;
}

/** A reply that hands back a token (bearer money) must reach its consumer. */
function carriesMoney(message: Reply | Record<string, unknown>): boolean {
  return 'refund_token' in message && typeof message.refund_token === 'string' && message.refund_token !== '';
}

/** A spool file as written by this or an earlier version; anything else is junk. */
function parseSpooled(json: unknown): Pending & { message?: Record<string, unknown> } {
  const r = json as Partial<Pending> & { message?: Record<string, unknown> };
  if (typeof r?.id !== 'string' || typeof r.route?.to !== 'string' || typeof r.deadline !== 'number' || typeof r.event?.id !== 'string') {
    throw new Error('not a spooled message');
  }
  return r as Pending & { message?: Record<string, unknown> };
}

/** A waiting message's place in the bound, and its retry timer. */
interface Waiting {
  pending: Pending;
  bytes: number;
  spooled: boolean;
  timer?: NodeJS.Timeout;
}

export class NostrOutbox implements Outbox {
  /** Insertion order = age order: the first entry is the oldest waiting message. */
  private readonly waiting = new Map<string, Waiting>();
  private waitingBytes = 0;
  /** Messages no longer waiting (sent, expired or dropped): an attempt still running for one stops. */
  private readonly released = new WeakSet<Pending>();
  private closed = false;

  constructor(private readonly opts: NostrOutboxOptions) {
    if (opts.spoolDir) mkdirSync(opts.spoolDir, { recursive: true, mode: 0o700 });
  }

  /**
   * First attempt now. Resolves when a relay accepted the message, or when it
   * was spooled for retries; rejects when it is neither (held in memory only,
   * or dropped), even though a memory copy is still retried.
   */
  async send(route: Route, message: Reply): Promise<void> {
    const channel: DmChannel = route.channel === 'nip04' ? 'nip04' : 'nip17';
    const event = sealDm({ sk: this.opts.sk, recipient: route.to, content: JSON.stringify(message), channel, replyTo: route.replyTo });
    const pending: Pending = { id: randomUUID(), route, event, deadline: Date.now() + (this.opts.retryForMs ?? 30 * 60_000) };
    if (carriesMoney(message)) pending.keep = true;
    await this.attempt(pending, 0);
  }

  /** Retry what an earlier run spooled and could not deliver. Call once the pool is started. */
  resume(): number {
    const dir = this.opts.spoolDir;
    if (!dir) return 0;
    let resumed = 0;
    const { records, broken } = readJsonRecords(dir, parseSpooled);
    // A torn write cannot happen (atomic), so what does not parse is foreign junk.
    for (const file of broken) rmSync(file, { force: true });
    records.sort((a, b) => a.deadline - b.deadline);
    for (const { message, ...pending } of records) {
      if (message) {
        // Spooled by an earlier version with its plaintext: rewritten without it.
        if (carriesMoney(message)) pending.keep = true;
        try {
          writeFileAtomic(this.spoolFile(pending), JSON.stringify(pending));
        } catch {
          // Retried from the old file; rewritten on the next start.
        }
      }
      if (!pending.keep && Date.now() > pending.deadline) {
        this.opts.logger.error({ to: pending.route.to, replyTo: pending.route.replyTo }, 'spooled message past its deadline dropped');
        this.unspool(pending);
        continue;
      }
      resumed++;
      this.hold({ pending, bytes: JSON.stringify(pending).length, spooled: true });
      this.attempt(pending, 0).catch(() => undefined);
    }
    if (resumed) this.opts.logger.info({ resumed }, 'resending messages no relay had accepted before the restart');
    return resumed;
  }

  private async attempt(p: Pending, n: number): Promise<void> {
    const { route } = p;
    try {
      const res = await this.opts.pool.publish(p.event);
      this.release(p.id);
      this.opts.logger.debug({ to: route.to, replyTo: route.replyTo, accepted: res.accepted.length }, 'message published');
      return;
    } catch (err) {
      const delay = Math.min(30_000, 1000 * 2 ** n);
      if (this.released.has(p)) return; // dropped meanwhile to keep the bound
      if (!p.keep && Date.now() + delay > p.deadline) {
        this.opts.logger.error({ to: route.to, replyTo: route.replyTo }, 'message dropped: no relay accepted it before its deadline');
        this.release(p.id);
        throw err;
      }
      let w = this.waiting.get(p.id);
      if (!w) {
        w = { pending: p, bytes: JSON.stringify(p).length, spooled: false };
        this.hold(w);
      }
      if (this.released.has(p)) throw err; // holding it pushed itself out: not kept
      if (!w.spooled && this.opts.spoolDir) {
        try {
          writeFileAtomic(this.spoolFile(p), JSON.stringify(p));
          w.spooled = true;
        } catch (writeErr) {
          this.opts.logger.warn(
            { to: route.to, replyTo: route.replyTo, code: (writeErr as NodeJS.ErrnoException).code },
            'message could not be spooled to disk; retrying it from memory',
          );
        }
      }
      if (this.closed) {
        // Shutting down: the spool file carries it into the next run.
        if (!w.spooled) throw err;
        return;
      }
      this.opts.logger.warn({ to: route.to, replyTo: route.replyTo, retryInMs: delay }, 'no relay accepted the message; will retry');
      w.timer = setTimeout(() => {
        w.timer = undefined;
        this.attempt(p, n + 1).catch(() => undefined);
      }, delay);
      // Retried from memory, but a crash would lose it: the caller must not count on it.
      if (!w.spooled) throw new Error('no relay accepted the message and it could not be spooled; retrying it from memory only');
    }
  }

  /** Count a message as waiting; drop the oldest droppable ones while the bound is exceeded. */
  private hold(w: Waiting): void {
    this.waiting.set(w.pending.id, w);
    this.waitingBytes += w.bytes;
    const maxCount = this.opts.maxWaiting ?? DEFAULT_MAX_WAITING;
    const maxBytes = this.opts.maxWaitingBytes ?? DEFAULT_MAX_WAITING_BYTES;
    while (this.waiting.size > maxCount || this.waitingBytes > maxBytes) {
      let oldest: Waiting | undefined;
      for (const candidate of this.waiting.values()) {
        if (!candidate.pending.keep) {
          oldest = candidate;
          break;
        }
      }
      if (!oldest) {
        this.opts.logger.warn({ waiting: this.waiting.size, waitingBytes: this.waitingBytes }, 'outbox over its bound with messages carrying money only; they are kept');
        return;
      }
      const { route } = oldest.pending;
      this.opts.logger.error(
        { to: route.to, replyTo: route.replyTo, waiting: this.waiting.size, waitingBytes: this.waitingBytes },
        'outbox full: oldest waiting message dropped',
      );
      this.release(oldest.pending.id);
    }
  }

  /** Forget a waiting message: its timer, its spool file, its share of the bound. */
  private release(id: string): void {
    const w = this.waiting.get(id);
    if (!w) return;
    this.waiting.delete(id);
    this.released.add(w.pending);
    this.waitingBytes -= w.bytes;
    clearTimeout(w.timer);
    if (w.spooled) this.unspool(w.pending);
  }

  /** Messages waiting for a relay's OK now. */
  get waitingCount(): number {
    return this.waiting.size;
  }

  private spoolFile(p: Pending): string {
    return join(this.opts.spoolDir!, `${p.id}.json`);
  }

  private unspool(p: Pending): void {
    if (this.opts.spoolDir) rmSync(this.spoolFile(p), { force: true });
  }

  close(): void {
    this.closed = true;
    for (const w of this.waiting.values()) clearTimeout(w.timer);
  }
}
