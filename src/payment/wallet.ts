/**
 * The provider's Cashu wallet: the `Payments` the agent calls. Redeems
 * consumers' tokens by a NUT-03 swap into outputs derived from the wallet
 * seed (NUT-13), hands out refund and withdrawal tokens, and after a crash
 * finds out what the mint did (NUT-07) and restores the outputs (NUT-09).
 *
 * Money is never only in memory: before a swap is sent, its counters and
 * inputs are journaled (`swaps/`); a token handed out is written down before
 * its proofs leave the wallet's files.
 *
 * Longer than the house's ~350 lines: redeem, refund, withdraw and crash
 * recovery share the swap journal and the counters' invariants.
 */
import { getEncodedToken, type CounterSource, type Proof, type ProofLike, type Wallet } from '@cashu/cashu-ts';
import type { Logger } from '../util/logger.js';
import { isDefiniteRefusal, MintDirectory, requestWithTimeout, toPaymentError } from './mint-client.js';
import { REF_PATTERN, WalletStore, type IssuedRecord, type PendingSwap, type ReceivedRecord, type StoredProof } from './store.js';
import { canonicalMintUrl, fromMsats, inputFee, readTokenHeader, readTokenProofs, toMsats, type PaymentUnit } from './token.js';
import { PaymentError, type Payments, type Received, type TokenQuote } from './types.js';

export interface CashuPaymentsOptions {
  stateDir: string;
  /** 64-byte NUT-13 seed every output is derived from (see `walletSeedFromProviderKey`). */
  seed: Uint8Array;
  /** Mints whose tokens are accepted; others are refused without a request. */
  whitelistedMints: readonly string[];
  /** Per-request timeout for mint calls. */
  mintTimeoutMs?: number;
  logger: Logger;
}

/** Records of received payments are kept this long: they answer retries after a crash, nothing else. */
const RECEIVED_RECORD_MS = 30 * 24 * 3600 * 1000;

/** Least time between two fetches of a mint's keysets caused by tokens naming keysets not in the cache. */
const KEYSET_REFRESH_MS = 60_000;

type SettleOutcome = 'restored' | 'untouched' | 'spent_elsewhere' | 'pending';

interface InspectedToken {
  quote: TokenQuote;
  proofs: Proof[];
}

export class CashuPayments implements Payments {
  readonly store: WalletStore;
  private readonly mints: MintDirectory;
  private readonly whitelist: ReadonlySet<string>;
  private readonly seed: Uint8Array;
  private readonly log: Logger;

  constructor(opts: CashuPaymentsOptions) {
    if (opts.seed.length < 16) throw new Error('wallet seed too short');
    this.store = new WalletStore(opts.stateDir);
    this.mints = new MintDirectory(this.store, requestWithTimeout(opts.mintTimeoutMs ?? 10_000));
    this.whitelist = new Set(opts.whitelistedMints.map((m) => canonicalMintUrl(m) ?? m));
    this.seed = opts.seed;
    this.log = opts.logger;
  }

  async quote(token: string): Promise<TokenQuote> {
    return (await this.inspect(token)).quote;
  }

  async redeem(token: string, ref: string): Promise<Received> {
    checkRef(ref);
    const done = this.store.received(ref);
    if (done) return asReceived(done);
    const { quote, proofs } = await this.inspect(token).catch(rethrowUntouched);
    const unit = quote.unit;
    return this.store.lock(async () => {
      const finished = await this.finishEarlierSwaps('redeem', ref);
      if (finished) return asReceived(finished);
      const metadata = await this.mints.get(quote.mint).catch(rethrowUntouched);
      const reserved: PendingSwap['counters'] = [];
      const wallet = this.mints.wallet(metadata, unit, this.seed, this.counterSource(reserved));
      let preview;
      try {
        // Without the consumer's DLEQ proofs: the mint checks every input's signature at the swap
        // anyway, and checking them here would cost the event loop ~6 curve multiplications per input.
        preview = await wallet.prepareSwapToReceive({ mint: quote.mint, unit, proofs: proofs.map(({ dleq: _dleq, ...p }) => p) });
      } catch (err) {
        throw err instanceof PaymentError ? asUntouched(err) : new PaymentError('invalid_token', 'the token cannot be swapped at its mint', true);
      }
      const swap: PendingSwap = {
        id: WalletStore.newId('redeem'),
        kind: 'redeem',
        ref,
        mint: quote.mint,
        unit,
        counters: reserved,
        inputs: preview.inputs.map(stored),
        createdAt: new Date().toISOString(),
      };
      await this.store.putPendingSwap(swap);
      let keep: Proof[];
      try {
        ({ keep } = await wallet.completeSwap(preview));
      } catch (err) {
        if (isDefiniteRefusal(err)) {
          await this.store.deletePendingSwap(swap.id);
          throw asUntouched(toPaymentError(err));
        }
        const outcome = await this.settle(swap).catch(() => 'pending' as const);
        const received = this.store.received(ref);
        if (outcome === 'restored' && received) return asReceived(received);
        if (outcome === 'spent_elsewhere') throw new PaymentError('token_already_spent', 'the token was already spent');
        if (outcome === 'untouched') throw new PaymentError('mint_network_error', 'the mint could not be reached; the token was not taken', true);
        this.log.warn({ ref, mint: quote.mint }, 'swap outcome unknown: kept in the wallet journal, settled at the next recover()');
        throw new PaymentError('mint_network_error', 'the mint did not answer the swap; the outcome is settled at the next start');
      }
      const received = await this.saveSwapOutputs(swap, keep.map(stored));
      this.log.info({ ref, mint: quote.mint, unit, msats: received.msats }, 'payment redeemed into the wallet');
      return received;
    });
  }

  async refund(mint: string, msats: number, ref: string, unit?: PaymentUnit): Promise<string> {
    checkRef(ref);
    const prior = this.store.refund(ref);
    if (prior) return prior.token;
    const canonical = canonicalMintUrl(mint);
    if (!canonical) throw new PaymentError('mint_error', 'not a mint URL');
    return this.store.lock(async () => {
      await this.finishEarlierSwaps('refund', ref);
      const again = this.store.refund(ref);
      if (again) return again.token;
      const chosen = unit ?? this.defaultUnit(canonical);
      const amount = fromMsats(msats, chosen);
      if (!(amount > 0)) return '';
      const token = await this.issue('refund', ref, canonical, chosen, amount);
      this.log.info({ ref, mint: canonical, unit: chosen, amount }, 'refund token issued');
      return token;
    });
  }

  async balance(): Promise<Array<{ mint: string; unit: 'sat' | 'msat'; amount: number }>> {
    return this.store.lock(async () =>
      this.store
        .purses()
        .map((p) => ({ mint: p.mint, unit: p.unit, amount: sum(p.proofs) }))
        .filter((b) => b.amount > 0)
        .sort((a, b) => a.mint.localeCompare(b.mint) || a.unit.localeCompare(b.unit)),
    );
  }

  async withdraw(mint: string, amount?: number, unit?: PaymentUnit): Promise<string> {
    const canonical = canonicalMintUrl(mint);
    if (!canonical) throw new PaymentError('mint_error', 'not a mint URL');
    if (amount !== undefined && !(Number.isSafeInteger(amount) && amount > 0)) throw new PaymentError('mint_error', 'the amount must be a positive whole number');
    return this.store.lock(async () => {
      const chosen = unit ?? this.defaultUnit(canonical);
      const token = await this.issue('withdraw', WalletStore.newId('withdraw'), canonical, chosen, amount);
      this.log.info({ mint: canonical, unit: chosen, amount: amount ?? 'all' }, 'withdrawal token issued');
      return token;
    });
  }

  async recover(): Promise<void> {
    await this.store.lock(async () => {
      // A token written out takes its proofs with it, even if the crash came before the purse was rewritten.
      const issued = this.store.issuedSecrets();
      for (const purse of this.store.purses()) {
        const gone = purse.proofs.filter((p) => issued.has(p.secret)).map((p) => p.secret);
        if (gone.length) await this.store.updatePurse(purse.mint, purse.unit, { remove: gone });
      }
      for (const swap of this.store.pendingSwaps()) {
        try {
          const outcome = await this.settle(swap);
          this.log.info({ swap: swap.id, kind: swap.kind, ref: swap.ref, outcome }, 'settled a swap interrupted before its outputs were saved');
        } catch (err) {
          this.log.error({ swap: swap.id, kind: swap.kind, ref: swap.ref, code: toPaymentError(err).code }, 'could not settle an interrupted swap; kept for the next start');
        }
      }
      this.store.pruneReceived(RECEIVED_RECORD_MS);
    });
  }

  /**
   * Disaster recovery when the wallet folder is lost but the provider key is
   * not: scan every sat/msat keyset of each whitelisted mint with NUT-09
   * restore from counter 0 until `gapLimit` unused counters in a row, keep the
   * unspent proofs not handed out in a token, and move the counters past the
   * last one used. Returns what was added per mint and unit.
   */
  async restoreFromSeed(gapLimit = 300): Promise<Array<{ mint: string; unit: PaymentUnit; amount: number }>> {
    return this.store.lock(async () => {
      const found: Array<{ mint: string; unit: PaymentUnit; amount: number }> = [];
      const issued = this.store.issuedSecrets();
      for (const mint of this.whitelist) {
        const metadata = await this.mints.refresh(mint);
        for (const keyset of this.mints.keysets(metadata)) {
          if (keyset.unit !== 'sat' && keyset.unit !== 'msat') continue;
          const unit = keyset.unit;
          const wallet = this.mints.wallet(metadata, unit, this.seed, this.counterSource([]));
          let restored;
          try {
            restored = await wallet.batchRestore(gapLimit, gapLimit, 0, keyset.id);
          } catch (err) {
            throw toPaymentError(err);
          }
          if (restored.lastCounterWithSignature !== undefined) await wallet.counters.advanceToAtLeast(keyset.id, restored.lastCounterWithSignature + 1);
          let proofs = restored.proofs.map(stored).filter((p) => !issued.has(p.secret));
          if (proofs.length === 0) continue;
          const states = await wallet.checkProofsStates(proofs);
          proofs = proofs.filter((_, i) => states[i]?.state === 'UNSPENT');
          const before = sum(this.store.purse(mint, unit).proofs);
          const after = sum((await this.store.updatePurse(mint, unit, { add: proofs })).proofs);
          if (after > before) found.push({ mint, unit, amount: after - before });
        }
      }
      this.log.info({ found }, 'wallet restored from the seed');
      return found;
    });
  }

  /** The offline checks of `quote`, keeping the decoded proofs for the swap. */
  private async inspect(token: string): Promise<InspectedToken> {
    const header = readTokenHeader(token, this.whitelist);
    let metadata = this.mints.cached(header.mint) ?? (await this.mints.refresh(header.mint));
    let keysets = this.mints.keysets(metadata);
    let proofs = readTokenProofs(token, keysets.map((k) => k.id));
    if (proofs.some((p) => !keysets.some((k) => k.id === p.id))) {
      // A keyset the cache does not know: the mint may have rotated keys since.
      // At most one refetch a minute, so made-up keyset ids cannot turn tokens into requests to the mint.
      if (this.mints.refreshedWithin(header.mint, KEYSET_REFRESH_MS)) throw new PaymentError('invalid_token', 'the token names a keyset its mint does not publish');
      metadata = await this.mints.refresh(header.mint);
      keysets = this.mints.keysets(metadata);
      proofs = readTokenProofs(token, keysets.map((k) => k.id));
    }
    const unitOf = new Map(keysets.map((k) => [k.id, k.unit]));
    if (proofs.some((p) => unitOf.get(p.id) !== header.unit))
      throw new PaymentError('invalid_token', "the token's proofs are not of a keyset of its mint and unit");
    const fee = inputFee(
      proofs.map((p) => p.id),
      new Map(keysets.map((k) => [k.id, k.feePpk])),
    );
    return {
      proofs,
      quote: {
        mint: header.mint,
        unit: header.unit,
        faceMsats: toMsats(header.amount, header.unit),
        netMsats: toMsats(Math.max(0, header.amount - fee), header.unit),
      },
    };
  }

  /**
   * A token of `amount` (everything if undefined) from the wallet's proofs at
   * `mint` in `unit`. An exact set of proofs goes out as it is; otherwise a
   * swap splits off the amount. The token is on disk before its proofs leave
   * the purse file.
   */
  private async issue(kind: 'refund' | 'withdraw', ref: string, mint: string, unit: PaymentUnit, amount: number | undefined): Promise<string> {
    const purse = this.store.purse(mint, unit);
    const balance = sum(purse.proofs);
    const wanted = amount ?? balance;
    if (wanted <= 0 || balance < wanted) throw new PaymentError('mint_error', `the wallet holds ${balance} ${unit} at this mint, less than ${wanted}`);
    const exact = amount === undefined ? purse.proofs : exactSelection(purse.proofs, wanted);
    if (exact) return this.writeIssued(kind, { ref, mint, unit, amount: wanted, proofs: exact });

    const metadata = await this.mints.get(mint);
    const reserved: PendingSwap['counters'] = [];
    const wallet = this.mints.wallet(metadata, unit, this.seed, this.counterSource(reserved));
    let preview;
    try {
      preview = await wallet.prepareSwapToSend(wanted, purse.proofs as ProofLike[], { includeFees: false });
    } catch (err) {
      throw toPaymentError(err);
    }
    const swap: PendingSwap = {
      id: WalletStore.newId(kind),
      kind,
      ref,
      mint,
      unit,
      counters: reserved,
      inputs: preview.inputs.map(stored),
      createdAt: new Date().toISOString(),
    };
    await this.store.putPendingSwap(swap);
    let result;
    try {
      result = await wallet.completeSwap(preview);
    } catch (err) {
      if (isDefiniteRefusal(err)) {
        await this.store.deletePendingSwap(swap.id);
      } else {
        await this.settle(swap).catch(() => undefined);
      }
      throw toPaymentError(err);
    }
    const token = await this.writeIssued(kind, { ref, mint, unit, amount: wanted, proofs: result.send.map(stored), removeAlso: swap.inputs });
    await this.store.updatePurse(mint, unit, { add: result.keep.map(stored) });
    await this.store.deletePendingSwap(swap.id);
    return token;
  }

  private async writeIssued(
    kind: 'refund' | 'withdraw',
    t: { ref: string; mint: string; unit: PaymentUnit; amount: number; proofs: StoredProof[]; removeAlso?: StoredProof[] },
  ): Promise<string> {
    const token = getEncodedToken({ mint: t.mint, unit: t.unit, proofs: t.proofs as unknown as Proof[] });
    const record: IssuedRecord = {
      ref: t.ref,
      mint: t.mint,
      unit: t.unit,
      amount: t.amount,
      token,
      secrets: t.proofs.map((p) => p.secret),
      at: new Date().toISOString(),
    };
    await this.store.putIssued(kind, record);
    await this.store.updatePurse(t.mint, t.unit, { remove: [...record.secrets, ...(t.removeAlso ?? []).map((p) => p.secret)] });
    return token;
  }

  /** Outputs of a finished redeem: into the purse, then the received record, then the journal entry goes. */
  private async saveSwapOutputs(swap: PendingSwap, outputs: StoredProof[]): Promise<Received> {
    await this.store.updatePurse(swap.mint, swap.unit, { add: outputs });
    const record: ReceivedRecord = {
      ref: swap.ref ?? swap.id,
      mint: swap.mint,
      unit: swap.unit,
      msats: toMsats(sum(outputs), swap.unit),
      at: new Date().toISOString(),
    };
    if (swap.ref) await this.store.putReceived(record);
    await this.store.deletePendingSwap(swap.id);
    return asReceived(record);
  }

  /**
   * Find out what became of a journaled swap: inputs unspent → it never
   * happened; spent → restore its outputs from the seed (NUT-09) and keep the
   * unspent ones that were not handed out. Throws when the mint is unreachable.
   */
  private async settle(swap: PendingSwap): Promise<SettleOutcome> {
    const metadata = await this.mints.get(swap.mint);
    const wallet = this.mints.wallet(metadata, swap.unit, this.seed, this.counterSource([]));
    const states = await wallet.checkProofsStates(swap.inputs);
    if (states.some((s) => s.state === 'PENDING')) return 'pending';
    if (!states.some((s) => s.state === 'SPENT')) {
      await this.store.deletePendingSwap(swap.id);
      return 'untouched';
    }
    const restored: StoredProof[] = [];
    for (const range of swap.counters) {
      if (range.count === 0) continue;
      const { proofs } = await wallet.restore(range.start, range.count, { keysetId: range.keysetId });
      restored.push(...proofs.map(stored));
    }
    if (restored.length === 0) {
      // The inputs were spent, but not by this swap: someone else swapped them first.
      await this.store.deletePendingSwap(swap.id);
      return 'spent_elsewhere';
    }
    const issued = this.store.issuedSecrets();
    let mine = restored.filter((p) => !issued.has(p.secret));
    if (mine.length) {
      const outputStates = await wallet.checkProofsStates(mine);
      mine = mine.filter((_, i) => outputStates[i]?.state === 'UNSPENT');
    }
    if (swap.kind === 'redeem') {
      await this.saveSwapOutputs(swap, mine);
    } else {
      await this.store.updatePurse(swap.mint, swap.unit, { add: mine, remove: swap.inputs.map((p) => p.secret) });
      await this.store.deletePendingSwap(swap.id);
    }
    return 'restored';
  }

  /** Settle swaps of `ref` a crash left behind, so a retry neither double-counts nor loses them. */
  private async finishEarlierSwaps(kind: PendingSwap['kind'], ref: string): Promise<ReceivedRecord | undefined> {
    for (const swap of this.store.pendingSwaps()) {
      if (swap.kind !== kind || swap.ref !== ref) continue;
      const outcome = await this.settle(swap).catch((err: unknown) => {
        throw toPaymentError(err);
      });
      if (outcome === 'pending') throw new PaymentError('token_pending', 'an earlier attempt of this payment is pending at the mint');
    }
    return kind === 'redeem' ? this.store.received(ref) : undefined;
  }

  private defaultUnit(mint: string): PaymentUnit {
    return sum(this.store.purse(mint, 'sat').proofs) > 0 || sum(this.store.purse(mint, 'msat').proofs) === 0 ? 'sat' : 'msat';
  }

  /** Counters reserved on disk (before any output is derived) and noted in `reserved` for the swap journal. */
  private counterSource(reserved: PendingSwap['counters']): CounterSource {
    const store = this.store;
    return {
      async reserve(keysetId: string, n: number) {
        const start = await store.reserveCounters(keysetId, n);
        reserved.push({ keysetId, start, count: n });
        return { start, count: n };
      },
      async advanceToAtLeast(keysetId: string, minNext: number) {
        const next = store.counters()[keysetId] ?? 0;
        if (next < minNext) await store.reserveCounters(keysetId, minNext - next);
      },
      async snapshot() {
        return store.counters();
      },
    };
  }
}

/** An error from before the swap was sent, or the mint's definite refusal of it: the token was not swapped. */
function asUntouched(err: unknown): PaymentError {
  const e = toPaymentError(err);
  return e.untouched ? e : new PaymentError(e.code, e.message, true);
}

function rethrowUntouched(err: unknown): never {
  throw asUntouched(err);
}

function checkRef(ref: string): void {
  if (typeof ref !== 'string' || !REF_PATTERN.test(ref)) throw new PaymentError('mint_error', 'payment reference must match [A-Za-z0-9._:-]{1,128}');
}

function asReceived(r: ReceivedRecord): Received {
  return { mint: r.mint, unit: r.unit, msats: r.msats };
}

function stored(p: Pick<Proof, 'id' | 'secret' | 'C'> & { amount: unknown }): StoredProof {
  const amount = typeof p.amount === 'number' ? p.amount : Number((p.amount as { toString(): string }).toString());
  return { id: p.id, amount, secret: p.secret, C: p.C };
}

function sum(proofs: readonly { amount: number }[]): number {
  return proofs.reduce((total, p) => total + p.amount, 0);
}

/** A subset of `proofs` summing to exactly `amount`, largest first; undefined if greedy finds none. */
function exactSelection(proofs: readonly StoredProof[], amount: number): StoredProof[] | undefined {
  const picked: StoredProof[] = [];
  let left = amount;
  for (const p of [...proofs].sort((a, b) => b.amount - a.amount)) {
    if (p.amount <= left) {
      picked.push(p);
      left -= p.amount;
    }
    if (left === 0) return picked;
  }
  return undefined;
}
