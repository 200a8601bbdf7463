/**
 * The consumer side of the protocol: send a request as an encrypted DM to a
 * provider and collect the replies that name it. Used by the `paygress` CLI,
 * the demo, the tests and the benchmarks — one client, not four.
 */
import { randomBytes } from 'node:crypto';
import { dmFilter, openDm, sealDmRequest } from '../nostr/dm.js';
import { pubkeyOf } from '../nostr/keys.js';
import { RelayPool } from '../nostr/relays.js';
import type { DmChannel, NostrEvent } from '../nostr/types.js';
import { silentLogger, type Logger } from '../util/logger.js';

/** A reply as it arrives: protocol JSON, kept loose so newer providers' fields pass through. */
export type ReplyMessage = Record<string, unknown> & { type: string; request_id?: string };

export interface ConsumerOptions {
  sk: Uint8Array;
  /** Provider's hex pubkey. */
  provider: string;
  relays: string[];
  channel?: DmChannel;
  logger?: Logger;
}

export class NoReplyError extends Error {
  override name = 'NoReplyError';
}

export class ConsumerClient {
  readonly pubkey: string;
  private readonly pool: RelayPool;
  private readonly listeners = new Set<(reply: ReplyMessage) => void>();
  private readonly channel: DmChannel;

  constructor(private readonly opts: ConsumerOptions) {
    this.pubkey = pubkeyOf(opts.sk);
    this.channel = opts.channel ?? 'nip17';
    this.pool = new RelayPool({ urls: opts.relays, logger: opts.logger ?? silentLogger });
  }

  /** Connect and listen for DMs from the provider. */
  async start(timeoutMs = 10_000): Promise<void> {
    this.pool.start();
    this.pool.subscribe([dmFilter(this.pubkey, 600)], (ev) => this.onEvent(ev));
    await this.pool.waitConnected(timeoutMs);
  }

  private onEvent(ev: NostrEvent): void {
    const opened = openDm(ev, this.opts.sk, this.pubkey);
    if (!opened.ok || opened.dm.sender !== this.opts.provider) return;
    let reply: unknown;
    try {
      reply = JSON.parse(opened.dm.content);
    } catch {
      return;
    }
    if (typeof reply !== 'object' || reply === null || typeof (reply as ReplyMessage).type !== 'string') return;
    for (const l of this.listeners) l(reply as ReplyMessage);
  }

  /** Every reply from the provider, whatever request it names (e.g. unprompted expiry notices). */
  onReply(listener: (reply: ReplyMessage) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /**
   * Send a request; returns its id (what replies carry in `request_id`).
   * A string is sent as the DM content verbatim (tests use it for hostile input).
   */
  async send(request: Record<string, unknown> | string): Promise<string> {
    const { event, requestId } = sealDmRequest({
      sk: this.opts.sk,
      recipient: this.opts.provider,
      // A rumor id is the hash of sender, second and content: two identical
      // requests in one second would be one request. A nonce keeps them apart.
      content: typeof request === 'string' ? request : JSON.stringify({ ...request, nonce: randomBytes(8).toString('hex') }),
      channel: this.channel,
    });
    await this.pool.publish(event);
    return requestId;
  }

  /**
   * Send a request and wait for the reply naming it that satisfies `done`
   * (default: the first one; an `error` reply always ends the wait).
   * `onProgress` sees every reply naming the request on the way.
   */
  async request(
    request: Record<string, unknown> | string,
    opts: {
      timeoutMs: number;
      done?: (r: ReplyMessage) => boolean;
      onProgress?: (r: ReplyMessage) => void;
      /** Called once a relay accepted the request (progress displays). */
      onSent?: (requestId: string) => void;
    },
  ): Promise<ReplyMessage> {
    const done = opts.done ?? (() => true);
    // Listen before sending: a fast provider can answer before publish() returns.
    const early: ReplyMessage[] = [];
    let deliver: ((r: ReplyMessage) => void) | undefined;
    const off = this.onReply((r) => (deliver ? deliver(r) : early.push(r)));
    try {
      const requestId = await this.send(request);
      opts.onSent?.(requestId);
      return await new Promise<ReplyMessage>((resolve, reject) => {
        const timer = setTimeout(
          () => reject(new NoReplyError(`no reply from the provider within ${Math.round(opts.timeoutMs / 1000)} s`)),
          opts.timeoutMs,
        );
        deliver = (r) => {
          if (r.request_id !== requestId) return;
          opts.onProgress?.(r);
          if (r.type === 'error' || done(r)) {
            clearTimeout(timer);
            resolve(r);
          }
        };
        for (const r of early.splice(0)) deliver(r);
      });
    } finally {
      off();
    }
  }

  /** Publish an already-built event on the client's relays. */
  async publishEvent(event: NostrEvent): Promise<void> {
    await this.pool.publish(event);
  }

  async close(): Promise<void> {
    this.listeners.clear();
    await this.pool.close();
  }
}
