/**
 * Sends the agent's messages as encrypted DMs. A message no relay accepted is
 * not dropped: it is retried in the background with backoff until its
 * deadline, so a relay outage delays replies instead of losing them.
 */
import type { Outbox, Route } from '../agent/agent.js';
import { sealDm } from '../nostr/dm.js';
import type { RelayPool } from '../nostr/relays.js';
import type { DmChannel } from '../nostr/types.js';
import type { Logger } from '../util/logger.js';

export interface NostrOutboxOptions {
  sk: Uint8Array;
  pool: RelayPool;
  logger: Logger;
  /** How long a message keeps being retried after the first failure. */
  retryForMs?: number;
}

export class NostrOutbox implements Outbox {
  private readonly retries = new Set<NodeJS.Timeout>();
  private closed = false;

  constructor(private readonly opts: NostrOutboxOptions) {}

  async send(route: Route, message: Record<string, unknown>): Promise<void> {
    const channel: DmChannel = route.channel === 'nip04' ? 'nip04' : 'nip17';
    const content = JSON.stringify(message);
    const deadline = Date.now() + (this.opts.retryForMs ?? 10 * 60_000);
    const attempt = async (n: number): Promise<void> => {
      // A fresh seal per attempt: same content, new event; the consumer matches on request_id.
      const event = sealDm({ sk: this.opts.sk, recipient: route.to, content, channel, replyTo: route.replyTo });
      try {
        const res = await this.opts.pool.publish(event);
        this.opts.logger.debug({ to: route.to, replyTo: route.replyTo, accepted: res.accepted.length }, 'message published');
      } catch (err) {
        const delay = Math.min(30_000, 1000 * 2 ** n);
        if (this.closed || Date.now() + delay > deadline) {
          this.opts.logger.error({ to: route.to, replyTo: route.replyTo }, 'message dropped: no relay accepted it before its deadline');
          throw err;
        }
        this.opts.logger.warn({ to: route.to, replyTo: route.replyTo, retryInMs: delay }, 'no relay accepted the message; will retry');
        const timer = setTimeout(() => {
          this.retries.delete(timer);
          attempt(n + 1).catch(() => undefined);
        }, delay);
        this.retries.add(timer);
      }
    };
    await attempt(0);
  }

  close(): void {
    this.closed = true;
    for (const t of this.retries) clearTimeout(t);
    this.retries.clear();
  }
}
