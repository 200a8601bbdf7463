/**
 * The payment room's front door: builds the provider's wallet from the
 * config and the provider key. The agent sees only `Payments` (types.ts).
 */
import { hmac } from '@noble/hashes/hmac.js';
import { sha512 } from '@noble/hashes/sha2.js';
import type { Logger } from '../util/logger.js';
import type { Payments } from './types.js';
import { CashuPayments } from './wallet.js';

export interface PaymentSettings {
  whitelistedMints: string[];
  mintTimeoutMs?: number;
}

/**
 * The wallet's NUT-13 seed, derived from the provider's secret key with a
 * domain-separated HMAC rather than kept in a file of its own: the key file
 * the operator already backs up restores the money too, and nothing has to be
 * created beside it in /etc, which the service cannot write (ProtectSystem=strict).
 */
export function walletSeedFromProviderKey(providerSecretKey: Uint8Array): Uint8Array {
  return hmac(sha512, new TextEncoder().encode('paygress-agent/cashu-wallet-seed/v1'), providerSecretKey);
}

export function createPayments(opts: {
  stateDir: string;
  providerSecretKey: Uint8Array;
  config: PaymentSettings;
  logger: Logger;
}): CashuPayments & Payments {
  return new CashuPayments({
    stateDir: opts.stateDir,
    seed: walletSeedFromProviderKey(opts.providerSecretKey),
    whitelistedMints: opts.config.whitelistedMints,
    mintTimeoutMs: opts.config.mintTimeoutMs,
    logger: opts.logger,
  });
}

export { PaymentError, type Payments, type PaymentErrorCode, type Received, type TokenQuote } from './types.js';
