/**
 * Where the agent's replies and a workload's notices go. The service
 * implements it over Nostr (and owns retries); tests keep messages in memory.
 */
import type { Reply } from '../protocol/replies.js';

export interface Route {
  to: string;
  channel: string;
  /** The request a message answers, if any. */
  replyTo?: string;
}

export interface Outbox {
  /**
   * Resolves once the message survives a crash (a relay took it, or it is on
   * disk for retries; one carrying a refund_token is never given up); rejects
   * otherwise. A payment's record ends only on a resolved send.
   */
  send(route: Route, reply: Reply): Promise<void>;
}
