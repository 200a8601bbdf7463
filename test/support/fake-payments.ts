/**
 * An in-memory `Payments` that keeps the contract of src/payment/types.ts
 * (quote offline, redeem idempotent per ref, refund idempotent per ref) with
 * no mint, so the agent's money paths can be tested in-process. The test
 * decides when a swap completes and how a swap or a refund fails.
 *
 * A token here is `fake:<msats>`; a refund token is `refund:<ref>:<msats>`.
 * Give the same object to a restarted agent: it is the wallet on disk.
 */
import { PaymentError, type Payments, type Received, type TokenQuote } from '../../src/payment/types.js';
import type { Gate } from './gate.js';

export const FAKE_MINT = 'http://127.0.0.1:9/fake-mint';

export function fakeToken(msats: number): string {
  return `fake:${msats}`;
}

export class FakePayments implements Payments {
  /** Swaps made, by ref. */
  readonly received = new Map<string, Received>();
  /** Refund tokens handed out, by ref. */
  readonly refunds = new Map<string, string>();
  /** While set, every redeem waits on it before it swaps. */
  redeemGate: Gate | undefined;
  /** The next redeem throws this; `afterSwap`: only after the swap happened (the money is in the wallet). */
  failNextRedeem: { error: Error; afterSwap: boolean } | undefined;
  /** The next this-many refunds fail as an unreachable mint would. */
  failRefunds = 0;

  async quote(token: string): Promise<TokenQuote> {
    const msats = parse(token);
    return { mint: FAKE_MINT, unit: 'msat', faceMsats: msats, netMsats: msats };
  }

  async redeem(token: string, ref: string): Promise<Received> {
    const done = this.received.get(ref);
    if (done) return done;
    const msats = parse(token);
    if (this.redeemGate) await this.redeemGate.passed;
    const failure = this.failNextRedeem;
    this.failNextRedeem = undefined;
    const received: Received = { mint: FAKE_MINT, unit: 'msat', msats };
    if (failure?.afterSwap) this.received.set(ref, received);
    if (failure) throw failure.error;
    this.received.set(ref, received);
    return received;
  }

  async refund(_mint: string, msats: number, ref: string): Promise<string> {
    const prior = this.refunds.get(ref);
    if (prior) return prior;
    if (this.failRefunds > 0) {
      this.failRefunds--;
      throw new PaymentError('mint_network_error', 'the mint could not be reached');
    }
    if (msats <= 0) return '';
    const token = `refund:${ref}:${msats}`;
    this.refunds.set(ref, token);
    return token;
  }

  async balance(): Promise<Array<{ mint: string; unit: 'sat' | 'msat'; amount: number }>> {
    const received = [...this.received.values()].reduce((t, r) => t + r.msats, 0);
    const refunded = [...this.refunds.values()].reduce((t, r) => t + Number(r.split(':')[2]), 0);
    return [{ mint: FAKE_MINT, unit: 'msat', amount: received - refunded }];
  }

  async withdraw(): Promise<string> {
    throw new PaymentError('mint_error', 'the fake wallet does not withdraw');
  }

  async recover(): Promise<void> {}

  /** What went back to the consumer for `ref`, in msats (0 if nothing). */
  refunded(ref: string): number {
    const token = this.refunds.get(ref);
    return token ? Number(token.split(':')[2]) : 0;
  }
}

function parse(token: string): number {
  const m = /^fake:(\d+)$/.exec(token);
  if (!m) throw new PaymentError('invalid_token', 'not a token');
  return Number(m[1]);
}
