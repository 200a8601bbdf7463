/**
 * The contract between the payment room (src/payment/: tokens, the provider's
 * wallet, talking to mints) and the agent (admission, spawn, top-up, refunds).
 * The agent only sees these types; it never imports cashu-ts.
 * Knows nothing of Nostr or qemu.
 */

/** Stable codes, used as v1 error codes and as upstream's `error_type`. */
export type PaymentErrorCode =
  | 'invalid_token'
  | 'token_already_spent'
  | 'token_pending'
  | 'non_whitelisted_mint'
  | 'insufficient_payment'
  | 'unsupported_unit'
  | 'mint_network_error'
  | 'mint_error';

export class PaymentError extends Error {
  constructor(
    readonly code: PaymentErrorCode,
    message: string,
    /**
     * The thrower knows the token was not swapped (nothing was sent to the
     * mint, or the mint said the swap did not happen): whatever the code, the
     * token is still the consumer's. False means only the code can tell.
     */
    readonly untouched = false,
  ) {
    super(message);
    this.name = 'PaymentError';
  }
}

/** What an offline look at a token found; nothing was sent anywhere. */
export interface TokenQuote {
  mint: string;
  unit: 'sat' | 'msat';
  /** Face value in msats, before the mint's input fees. */
  faceMsats: number;
  /** What the provider's wallet would hold after the swap (face value minus input fees), in msats. */
  netMsats: number;
}

/** Money received into the provider's wallet by a swap. */
export interface Received {
  mint: string;
  unit: 'sat' | 'msat';
  msats: number;
}

export interface Payments {
  /**
   * Offline checks only (format cashuA/cashuB, mint whitelisted, unit sat or
   * msat, fees from the mint's keysets already known to the wallet): never
   * contacts a mint that is not whitelisted; contacts none at all when the
   * keyset fees are cached. Throws PaymentError.
   */
  quote(token: string): Promise<TokenQuote>;
  /**
   * Swap the token's proofs at its mint into the provider's wallet (NUT-03,
   * deterministic outputs so a crash between swap and save is restorable).
   * `ref` names the journal entry this payment belongs to. Throws PaymentError;
   * on a throw the token's money is either untouched (still the consumer's) or
   * in the wallet — never lost — and the error says which via `code` and
   * `untouched` (set when the wallet knows no swap happened).
   */
  redeem(token: string, ref: string): Promise<Received>;
  /**
   * A token worth `msats` (rounded down to the unit) from the wallet's proofs
   * at `mint`, for a consumer. Proofs leave the wallet only once the token is
   * written to durable state; idempotent per `ref` (a retry after a crash
   * returns the same token). `unit`: the unit the consumer paid in (default:
   * the unit the wallet holds at `mint`, sat first). '' when `msats` is less
   * than one unit: nothing to refund.
   */
  refund(mint: string, msats: number, ref: string, unit?: 'sat' | 'msat'): Promise<string>;
  /** Balance per mint and unit. */
  balance(): Promise<Array<{ mint: string; unit: 'sat' | 'msat'; amount: number }>>;
  /** A token of `amount` (all if omitted) for the operator; proofs leave only once the token is written out. */
  withdraw(mint: string, amount?: number, unit?: 'sat' | 'msat'): Promise<string>;
  /** Called once at start: restore from the deterministic seed and settle half-done swaps/refunds. */
  recover(): Promise<void>;
}
