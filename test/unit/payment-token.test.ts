/**
 * Offline token inspection: no mint involved, tokens built by cashu-ts's own
 * encoder from made-up proofs (the signatures are not checked offline).
 */
import { describe, expect, it } from 'vitest';
import { getEncodedToken, type Proof } from '@cashu/cashu-ts';
import { canonicalMintUrl, fromMsats, inputFee, readTokenHeader, readTokenProofs } from '../../src/payment/token.js';
import { PaymentError } from '../../src/payment/types.js';

const MINT = 'https://mint.example.com';
const proof = (amount: number, secret: string): Proof => ({ id: '009a1f293253e41e', amount, secret, C: `02${'ab'.repeat(32)}` }) as unknown as Proof;
const token = (mint: string, unit: string, amounts: number[]) =>
  getEncodedToken({ mint, unit, proofs: amounts.map((a, i) => proof(a, `secret-${i}`)) });

function codeOf(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    if (err instanceof PaymentError) return `${err.code}: ${err.message}`;
    throw err;
  }
  return 'no error';
}

describe('token inspection', () => {
  it('reads mint, unit and face value of cashuB tokens, matching the whitelist after normalising the URL', () => {
    const whitelist = new Set([canonicalMintUrl('HTTPS://Mint.Example.com/')!]);
    expect(readTokenHeader(token(MINT, 'sat', [8, 2]), whitelist)).toEqual({ mint: MINT, unit: 'sat', amount: 10 });
    expect(readTokenHeader(token(`${MINT}/`, 'msat', [1024]), whitelist)).toEqual({ mint: MINT, unit: 'msat', amount: 1024 });
    expect(readTokenProofs(token(MINT, 'sat', [8, 2]), ['009a1f293253e41e']).map((p) => p.secret)).toEqual(['secret-0', 'secret-1']);
  });

  it('refuses other mints, other units and garbage with the contract codes, never echoing the input', () => {
    const whitelist = new Set([MINT]);
    expect(codeOf(() => readTokenHeader(token('https://evil.example.org', 'sat', [1]), whitelist))).toMatch(/^non_whitelisted_mint/);
    expect(codeOf(() => readTokenHeader(token(MINT, 'usd', [1]), whitelist))).toMatch(/^unsupported_unit/);
    for (const bad of ['', 'cashuB', 'cashuBzzzz-secret-payload', 'cashuA' + 'x'.repeat(100), 'lnbc1…', 'x'.repeat(70_000)]) {
      const result = codeOf(() => readTokenHeader(bad, whitelist));
      expect(result).toMatch(/^invalid_token/);
      expect(result).not.toContain('secret-payload');
    }
  });

  it('input fees: the sum of input_fee_ppk rounded up to a whole unit (NUT-02)', () => {
    const fees = new Map([['a', 100], ['b', 0], ['c', 1000]]);
    expect(inputFee(['a', 'a', 'a'], fees)).toBe(1);
    expect(inputFee(Array(10).fill('a'), fees)).toBe(1);
    expect(inputFee(Array(11).fill('a'), fees)).toBe(2);
    expect(inputFee(['b', 'b'], fees)).toBe(0);
    expect(inputFee(['c', 'c'], fees)).toBe(2);
  });

  it('msats back to a unit round down', () => {
    expect(fromMsats(37_999, 'sat')).toBe(37);
    expect(fromMsats(999, 'sat')).toBe(0);
    expect(fromMsats(999, 'msat')).toBe(999);
  });
});
