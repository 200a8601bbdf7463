/**
 * Token inspection without the network: format (cashuA/cashuB), mint URL,
 * unit, amounts in msats, the mint's input fee. Pure; total — every bad input
 * becomes a PaymentError, and no message repeats the token.
 */
import { getDecodedToken, getTokenMetadata, normalizeMintUrl, type Proof } from '@cashu/cashu-ts';
import { PaymentError } from './types.js';

export type PaymentUnit = 'sat' | 'msat';

/** Tokens larger than this are refused unread: no honest payment needs more. */
const MAX_TOKEN_CHARS = 64 * 1024;

export interface TokenHeader {
  mint: string;
  unit: PaymentUnit;
  /** Face value in the token's unit. */
  amount: number;
}

/** The mint URL in one canonical form, so a whitelist entry and a token's mint compare equal; undefined if it is no mint URL. */
export function canonicalMintUrl(url: string): string | undefined {
  try {
    return normalizeMintUrl(url);
  } catch {
    return undefined;
  }
}

/** What the token claims, before anything is checked against the mint: throws invalid_token, unsupported_unit or non_whitelisted_mint. */
export function readTokenHeader(token: string, whitelist: ReadonlySet<string>): TokenHeader {
  if (typeof token !== 'string' || token.length > MAX_TOKEN_CHARS) throw new PaymentError('invalid_token', 'not a Cashu token');
  const trimmed = token.trim();
  if (!/^cashu[AB]/.test(trimmed)) throw new PaymentError('invalid_token', 'not a Cashu token (cashuA… or cashuB…)');
  let meta: { mint: unknown; unit: unknown; amount: { toNumber(): number } };
  try {
    meta = getTokenMetadata(trimmed);
  } catch {
    throw new PaymentError('invalid_token', 'the token could not be decoded');
  }
  const mint = typeof meta.mint === 'string' ? canonicalMintUrl(meta.mint) : undefined;
  if (!mint) throw new PaymentError('invalid_token', 'the token names no valid mint URL');
  if (!whitelist.has(mint)) throw new PaymentError('non_whitelisted_mint', `mint ${mint} is not accepted here`);
  if (meta.unit !== 'sat' && meta.unit !== 'msat') throw new PaymentError('unsupported_unit', 'only sat and msat tokens are accepted');
  let amount: number;
  try {
    amount = meta.amount.toNumber();
  } catch {
    throw new PaymentError('invalid_token', 'the token amount is out of range');
  }
  if (!Number.isSafeInteger(amount * 1000) || amount <= 0) throw new PaymentError('invalid_token', 'the token amount is out of range');
  return { mint, unit: meta.unit, amount };
}

/** The token's proofs, with short keyset ids resolved against the mint's keysets; throws invalid_token. */
export function readTokenProofs(token: string, keysetIds: readonly string[]): Proof[] {
  let proofs: unknown;
  try {
    proofs = getDecodedToken(token.trim(), keysetIds).proofs;
  } catch {
    throw new PaymentError('invalid_token', 'the token could not be decoded');
  }
  if (!Array.isArray(proofs) || proofs.length === 0 || proofs.length > 1000) throw new PaymentError('invalid_token', 'the token holds no usable proofs');
  for (const p of proofs as Array<Record<string, unknown>>) {
    if (typeof p.id !== 'string' || typeof p.secret !== 'string' || typeof p.C !== 'string')
      throw new PaymentError('invalid_token', 'the token holds a malformed proof');
  }
  return proofs as Proof[];
}

export function toMsats(amount: number, unit: PaymentUnit): number {
  return unit === 'sat' ? amount * 1000 : amount;
}

/** The largest whole amount of `unit` worth at most `msats`. */
export function fromMsats(msats: number, unit: PaymentUnit): number {
  return unit === 'sat' ? Math.floor(msats / 1000) : Math.floor(msats);
}

/** NUT-02 input fee of spending these proofs: the sum of their keysets' `input_fee_ppk`, rounded up to whole units. */
export function inputFee(proofKeysetIds: readonly string[], feePpkByKeyset: ReadonlyMap<string, number>): number {
  let ppk = 0;
  for (const id of proofKeysetIds) ppk += feePpkByKeyset.get(id) ?? 0;
  return Math.ceil(ppk / 1000);
}
