/**
 * Publishes the offer at start (and again whenever its content would change,
 * checked at every beat) and a pair of heartbeats every `heartbeatSeconds`.
 * A failed publish is logged and retried at the next beat, never fatal.
 */
import { signEvent } from '../nostr/fast-crypto.js';
import type { NostrEvent } from '../nostr/types.js';
import type { Logger } from '../util/logger.js';
import { freeCapacity, readHostResources, type HeldResources } from './capacity.js';
import { heartbeatEvents, offerEvent, type EventTemplate, type OfferFacts } from './events.js';

export interface DiscoveryPublisherOptions {
  sk: Uint8Array;
  pubkey: string;
  /** Anything with the RelayPool's publish. */
  pool: { publish(ev: NostrEvent): Promise<unknown> };
  /** Read at every beat, so a changed offer is republished. */
  offer: () => OfferFacts;
  /** What leases (and the agent's own idle VMs) hold right now. */
  held: () => readonly HeldResources[];
  /** Workloads to report as active; default: one per `held` entry. */
  active?: () => number;
  vmRoot: string;
  heartbeatSeconds: number;
  logger: Logger;
}

export class DiscoveryPublisher {
  private timer: NodeJS.Timeout | undefined;
  private lastOffer: string | undefined;
  private running: Promise<void> | undefined;
  private stopped = false;

  constructor(private readonly opts: DiscoveryPublisherOptions) {}

  start(): void {
    if (this.timer || this.stopped) return;
    void this.beat();
    this.timer = setInterval(() => void this.beat(), this.opts.heartbeatSeconds * 1000);
    this.timer.unref?.();
  }

  /** One round: offer if new or changed, then both heartbeats. Overlapping rounds are skipped. */
  beat(): Promise<void> {
    if (this.running || this.stopped) return this.running ?? Promise.resolve();
    this.running = this.round().finally(() => (this.running = undefined));
    return this.running;
  }

  private async round(): Promise<void> {
    const now = Math.floor(Date.now() / 1000);
    const offer = offerEvent(this.opts.offer(), now);
    if (offer.content !== this.lastOffer) {
      if (await this.publish(offer, 'offer')) this.lastOffer = offer.content;
    }
    const held = this.opts.held();
    const active = this.opts.active?.() ?? held.length;
    const capacity = freeCapacity(await readHostResources(this.opts.vmRoot), held);
    for (const ev of heartbeatEvents(this.opts.pubkey, active, capacity, now)) await this.publish(ev, 'heartbeat');
    this.opts.logger.debug({ active, ...capacity }, 'heartbeat published');
  }

  private async publish(tpl: EventTemplate, what: string): Promise<boolean> {
    try {
      await this.opts.pool.publish(signEvent(tpl, this.opts.sk));
      return true;
    } catch (err) {
      this.opts.logger.warn({ kind: tpl.kind, err: (err as Error).message }, `${what} not accepted by any relay; next beat retries`);
      return false;
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    await this.running?.catch(() => undefined);
  }
}
