/**
 * The provider's wallet against the test mint (a real HTTP server with real
 * Cashu cryptography); consumers are cashu-ts Wallets. Ports 47400-47449.
 */
import { mkdtempSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { execa } from 'execa';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { bytesToHex } from '@noble/hashes/utils.js';
import { getEncodedToken, getDecodedToken, hasValidDleq, Wallet } from '@cashu/cashu-ts';
import { CashuPayments } from '../../src/payment/wallet.js';
import { PaymentError } from '../../src/payment/types.js';
import { silentLogger } from '../../src/util/logger.js';
import { consumerToken, DropConnection, TestMint, type MintUnit } from '../support/mint.js';

const CHILD = new URL('../support/mint-wallet-child.ts', import.meta.url).pathname;

const mint = new TestMint({ port: 47400, units: ['sat', 'msat', 'usd'], inputFeePpk: 100 });
const foreign = new TestMint({ port: 47401 });

beforeAll(async () => {
  await mint.start();
  await foreign.start();
});
afterAll(async () => {
  await mint.stop();
  await foreign.stop();
});
beforeEach(() => {
  mint.settlePending();
  mint.afterSwap = undefined;
});


/** Another wallet takes the token: proves it is real money at the mint. */
async function redeemElsewhere(token: string, unit: MintUnit = 'sat'): Promise<number> {
  const wallet = new Wallet(mint.url, { unit });
  await wallet.loadMint();
  const proofs = await wallet.receive(token);
  return proofs.reduce((s, p) => s + Number(p.amount.toString()), 0);
}

function newWallet(stateDir = mkdtempSync(join(tmpdir(), 'paymint-')), seed: Uint8Array = randomBytes(64)): CashuPayments & { stateDir: string } {
  const payments = new CashuPayments({ stateDir, seed, whitelistedMints: [mint.url], logger: silentLogger });
  return Object.assign(payments, { stateDir });
}

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (err) {
    if (err instanceof PaymentError) return err.code;
    throw err;
  }
  return 'no error';
}

function secretsOf(token: string): string[] {
  return getDecodedToken(token, mint.keysets.map((k) => k.id)).proofs.map((p) => p.secret);
}

describe('provider wallet', () => {
  it('quotes offline, redeems by a swap: the mint shows the inputs spent and the balance rose by the value after fees', async () => {
    const wallet = newWallet();
    const token = await consumerToken(mint, 100); // 64 + 32 + 4: three inputs at 100 ppk → 1 sat fee
    const quote = await wallet.quote(token);
    expect(quote).toEqual({ mint: mint.url, unit: 'sat', faceMsats: 100_000, netMsats: 99_000 });
    const received = await wallet.redeem(token, 'req-1');
    expect(received).toEqual({ mint: mint.url, unit: 'sat', msats: 99_000 });
    for (const secret of secretsOf(token)) expect(mint.stateOf(secret)).toBe('SPENT');
    expect(await wallet.balance()).toEqual([{ mint: mint.url, unit: 'sat', amount: 99 }]);
    const purse = join(wallet.stateDir, 'wallet', 'proofs');
    for (const f of readdirSync(purse)) expect(statSync(join(purse, f)).mode & 0o777).toBe(0o600);
    expect(statSync(join(wallet.stateDir, 'wallet')).mode & 0o777).toBe(0o700);
  });

  it('a second quote needs no request to the mint (keysets and fees are cached on disk)', async () => {
    const stateDir = mkdtempSync(join(tmpdir(), 'paymint-'));
    await newWallet(stateDir).quote(await consumerToken(mint, 8));
    const before = mint.requests.length;
    const restarted = newWallet(stateDir);
    await restarted.quote(await consumerToken(mint, 16).then((t) => ((mint.requests.length = before), t)));
    expect(mint.requests).toHaveLength(before);
  });

  it('a double spend is token_already_spent; the same ref again returns the first result', async () => {
    const wallet = newWallet();
    const token = await consumerToken(mint, 10);
    const first = await wallet.redeem(token, 'req-a');
    expect(await wallet.redeem(token, 'req-a')).toEqual(first);
    expect(await code(wallet.redeem(token, 'req-b'))).toBe('token_already_spent');
    expect(await code(newWallet().redeem(token, 'req-c'))).toBe('token_already_spent');
  });

  it('refuses a unit other than sat/msat and a mint not whitelisted, without a request to that mint', async () => {
    const wallet = newWallet();
    const usd = await consumerToken(mint, 5, 'usd');
    expect(await code(wallet.quote(usd))).toBe('unsupported_unit');
    expect(await code(wallet.redeem(usd, 'req-usd'))).toBe('unsupported_unit');
    for (const secret of secretsOf(usd)) expect(mint.stateOf(secret)).toBe('UNSPENT');

    const foreignToken = await consumerToken(foreign, 21);
    foreign.requests.length = 0;
    expect(await code(wallet.quote(foreignToken))).toBe('non_whitelisted_mint');
    expect(await code(wallet.redeem(foreignToken, 'req-foreign'))).toBe('non_whitelisted_mint');
    expect(foreign.requests).toEqual([]);
    expect(await code(wallet.quote('cashuBnot-a-token'))).toBe('invalid_token');

    // Keyset ids the mint never published: the keysets were fetched moments ago, so no request is sent for them.
    await wallet.quote(await consumerToken(mint, 1));
    const madeUp = getEncodedToken({ mint: mint.url, unit: 'sat', proofs: [{ id: '00ffffffffffffff', amount: 1, secret: 's', C: `02${'11'.repeat(32)}` }] as never });
    const before = mint.requests.length;
    expect(await code(wallet.quote(madeUp))).toBe('invalid_token');
    expect(await code(wallet.quote(madeUp))).toBe('invalid_token');
    expect(mint.requests.length).toBe(before);
    expect(await code(wallet.quote('hello'))).toBe('invalid_token');
  });

  it('the mint checks signatures: a forged proof is refused (invalid_token), the real ones stay unspent; its DLEQ proofs verify', async () => {
    const consumer = new Wallet(mint.url, { unit: 'sat' });
    await consumer.loadMint();
    const proofs = await consumer.mintProofsBolt11(9, await consumer.createMintQuoteBolt11(9));
    const keyset = consumer.keyChain.getKeyset(proofs[0]!.id);
    for (const p of proofs) expect(hasValidDleq(p, keyset)).toBe(true);
    // Without DLEQ proofs the wallet cannot tell offline: the refusal (NUT code 10001) comes from the mint.
    const forged = proofs.map(({ dleq: _dleq, ...p }, i) => (i === 0 ? { ...p, C: proofs[1]!.C } : p));
    const token = getEncodedToken({ mint: mint.url, unit: 'sat', proofs: forged });
    const swapsBefore = mint.requests.filter((r) => r.path === '/v1/swap').length;
    expect(await code(newWallet().redeem(token, 'req-forged'))).toBe('invalid_token');
    expect(mint.requests.filter((r) => r.path === '/v1/swap').length).toBe(swapsBefore + 1);
    for (const p of proofs) expect(mint.stateOf(p.secret)).toBe('UNSPENT');
  });

  it('msat tokens are counted in msats', async () => {
    const wallet = newWallet();
    const token = await consumerToken(mint, 5000, 'msat'); // 4096 + 512 + 256 + 128 + 8: five inputs → 1 msat fee
    expect(await wallet.redeem(token, 'req-msat')).toEqual({ mint: mint.url, unit: 'msat', msats: 4999 });
  });

  it('a refund token is redeemable by another wallet, is issued once per ref, and leaves the wallet', async () => {
    const wallet = newWallet();
    await wallet.redeem(await consumerToken(mint, 100), 'req-pay');
    const refund = await wallet.refund(mint.url, 37_999, 'req-pay', 'sat'); // rounds down to 37 sat
    expect(await wallet.refund(mint.url, 37_999, 'req-pay')).toBe(refund);
    // No exact set of proofs makes 37: a split swap, whose input fee the provider pays.
    const left = (await wallet.balance())[0]!.amount;
    expect(left).toBeLessThanOrEqual(99 - 37);
    expect(left).toBeGreaterThanOrEqual(99 - 37 - 2);
    expect(JSON.parse(readFileSync(join(wallet.stateDir, 'wallet', 'refunds', 'req-pay.json'), 'utf8')).token).toBe(refund);
    const fee = Math.ceil((secretsOf(refund).length * 100) / 1000);
    expect(await redeemElsewhere(refund)).toBe(37 - fee);
    expect(await wallet.refund(mint.url, 500, 'req-tiny', 'sat')).toBe('');
  });

  it('a refund written out but the purse not yet rewritten (a crash between the two): recover() takes its proofs out', async () => {
    const wallet = newWallet();
    await wallet.redeem(await consumerToken(mint, 100), 'req-r');
    const purse = wallet.store.purses()[0]!;
    const leaving = purse.proofs.find((p) => p.amount === 32)!;
    const token = getEncodedToken({ mint: mint.url, unit: 'sat', proofs: [leaving] as never });
    await wallet.store.putIssued('refund', { ref: 'req-r', mint: mint.url, unit: 'sat', amount: 32, token, secrets: [leaving.secret], at: new Date().toISOString() });
    expect(await wallet.balance()).toEqual([{ mint: mint.url, unit: 'sat', amount: 99 }]);
    await wallet.recover();
    expect(await wallet.balance()).toEqual([{ mint: mint.url, unit: 'sat', amount: 99 - 32 }]);
    expect(await wallet.refund(mint.url, 32_000, 'req-r')).toBe(token);
  });

  it('withdraw writes the token under the state dir first; another wallet redeems it', async () => {
    const wallet = newWallet();
    await wallet.redeem(await consumerToken(mint, 64), 'req-w1');
    await wallet.redeem(await consumerToken(mint, 20), 'req-w2');
    const part = await wallet.withdraw(mint.url, 30);
    const files = readdirSync(join(wallet.stateDir, 'wallet', 'withdrawals'));
    expect(files).toHaveLength(1);
    expect(JSON.parse(readFileSync(join(wallet.stateDir, 'wallet', 'withdrawals', files[0]!), 'utf8')).token).toBe(part);
    const held = (await wallet.balance())[0]!.amount;
    const rest = await wallet.withdraw(mint.url);
    expect(await wallet.balance()).toEqual([]);
    expect((await redeemElsewhere(part)) + (await redeemElsewhere(rest))).toBeGreaterThan(0);
    expect(secretsOf(rest).length).toBeGreaterThan(0);
    expect(held).toBeGreaterThan(0);
  });

  it('a token pending at the mint is token_pending and stays the consumer\'s', async () => {
    const wallet = newWallet();
    const token = await consumerToken(mint, 12);
    mint.pending = true;
    expect(await code(wallet.redeem(token, 'req-pending'))).toBe('token_pending');
    mint.settlePending();
    expect((await wallet.redeem(token, 'req-pending')).msats).toBe(11_000);
  });

  it('says when the token was certainly not swapped: the mint unreachable before the swap, or refusing it', async () => {
    const token = await consumerToken(mint, 12);
    const { proofs } = getDecodedToken(token, mint.keysets.map((k) => k.id));
    // Nothing listens on the discard port: the keyset fetch before the swap fails.
    const unreachable = 'http://127.0.0.1:9';
    const offline = new CashuPayments({ stateDir: mkdtempSync(join(tmpdir(), 'paymint-')), seed: randomBytes(64), whitelistedMints: [unreachable], logger: silentLogger });
    const beforeSwap = await offline.redeem(getEncodedToken({ mint: unreachable, unit: 'sat', proofs }), 'req-unreachable').catch((e: unknown) => e);
    expect(beforeSwap).toMatchObject({ code: 'mint_network_error', untouched: true });

    mint.pending = true;
    const refused = await newWallet().redeem(token, 'req-refused').catch((e: unknown) => e);
    expect(refused).toMatchObject({ code: 'token_pending', untouched: true });
    mint.settlePending();
    expect(secretsOf(token).map((s) => mint.stateOf(s))).toEqual(secretsOf(token).map(() => 'UNSPENT'));
  });

  it('a connection lost after the mint swapped is settled at once: checkstate, then restore from the seed', async () => {
    const wallet = newWallet();
    const token = await consumerToken(mint, 40);
    mint.afterSwap = () => {
      mint.afterSwap = undefined;
      throw new DropConnection();
    };
    expect(await wallet.redeem(token, 'req-drop')).toEqual({ mint: mint.url, unit: 'sat', msats: 39_000 });
    expect(await wallet.balance()).toEqual([{ mint: mint.url, unit: 'sat', amount: 39 }]);
    expect(mint.requests.some((r) => r.path === '/v1/restore')).toBe(true);
  });

  it('a mint with version-0 keyset ids (BIP32-derived secrets, older mints) works too: redeem and restore', async () => {
    const old = new TestMint({ port: 47402, keysetVersion: 0 });
    await old.start();
    try {
      expect(old.keysets[0]!.id).toMatch(/^00[0-9a-f]{14}$/);
      const wallet = new CashuPayments({ stateDir: mkdtempSync(join(tmpdir(), 'paymint-')), seed: randomBytes(64), whitelistedMints: [old.url], logger: silentLogger });
      old.afterSwap = () => {
        old.afterSwap = undefined;
        throw new DropConnection();
      };
      expect(await wallet.redeem(await consumerToken(old, 6), 'req-v0')).toEqual({ mint: old.url, unit: 'sat', msats: 6000 });
      expect(await wallet.balance()).toEqual([{ mint: old.url, unit: 'sat', amount: 6 }]);
    } finally {
      await old.stop();
    }
  });

  it('wallet folder lost, provider key kept: restoreFromSeed() finds the unspent money and moves the counters on', async () => {
    const seed = randomBytes(64);
    const first = newWallet(undefined, seed);
    await first.redeem(await consumerToken(mint, 50), 'req-s1');
    await first.redeem(await consumerToken(mint, 20), 'req-s2');
    await redeemElsewhere(await first.withdraw(mint.url, 16));
    const held = await first.balance();

    const rebuilt = newWallet(undefined, seed);
    expect(await rebuilt.restoreFromSeed()).toEqual(held);
    expect(await rebuilt.balance()).toEqual(held);
    // New outputs must not reuse a counter the mint has signed already (it would refuse with 11003).
    expect((await rebuilt.redeem(await consumerToken(mint, 8), 'req-s3')).msats).toBe(7000);
  });

  it('SIGKILL between the swap and saving its outputs: recover() restores the money, the ref answers as paid', async () => {
    const stateDir = mkdtempSync(join(tmpdir(), 'paymint-'));
    const seed = randomBytes(64);
    const token = await consumerToken(mint, 50);
    const child = execa('node', ['--import', 'tsx', CHILD, stateDir, bytesToHex(seed), mint.url, 'req-crash'], { input: token, reject: false });
    mint.afterSwap = () => {
      mint.afterSwap = undefined;
      child.kill('SIGKILL');
      throw new DropConnection();
    };
    const result = await child;
    expect(result.signal).toBe('SIGKILL');
    for (const secret of secretsOf(token)) expect(mint.stateOf(secret)).toBe('SPENT');
    expect(readdirSync(join(stateDir, 'wallet', 'swaps'))).toHaveLength(1);

    const restarted = newWallet(stateDir, seed);
    expect(await restarted.balance()).toEqual([]);
    await restarted.recover();
    expect(await restarted.balance()).toEqual([{ mint: mint.url, unit: 'sat', amount: 49 }]);
    expect(readdirSync(join(stateDir, 'wallet', 'swaps'))).toHaveLength(0);
    expect(await restarted.redeem(token, 'req-crash')).toEqual({ mint: mint.url, unit: 'sat', msats: 49_000 });
    const all = await restarted.withdraw(mint.url);
    expect(await redeemElsewhere(all)).toBeGreaterThan(40);
  });
});
