/**
 * Talking to mints: the HTTP request function cashu-ts uses (with a timeout),
 * the mapping of its errors to PaymentErrorCode, and the per-mint metadata
 * (info, keysets with their fees, keys) cached on disk so a token can be
 * priced without a request.
 */
import {
  HttpResponseError,
  JSONInt,
  KeyChain,
  Mint,
  MintOperationError,
  NetworkError,
  Wallet,
  type CounterSource,
  type GetInfoResponse,
  type KeyChainCache,
  type RequestFn,
} from '@cashu/cashu-ts';
import { PaymentError } from './types.js';
import type { WalletStore } from './store.js';
import type { PaymentUnit } from './token.js';

/** NUT error codes the wallet acts on (cashubtc/nuts error_codes.md). */
export const NUT_PROOFS_SPENT = 11001;
export const NUT_PROOFS_PENDING = 11002;
const NUT_PROOF_VERIFICATION_FAILED = 10001;
const NUT_KEYSET_UNKNOWN = 12001;

/** An HTTP request function for cashu-ts: JSON in and out, a per-request timeout, mint errors as MintOperationError. */
export function requestWithTimeout(timeoutMs: number): RequestFn {
  return (async (args: { endpoint: string; requestBody?: Record<string, unknown>; headers?: Record<string, string>; method?: string }) => {
    let res: Response;
    try {
      res = await fetch(args.endpoint, {
        method: args.method ?? (args.requestBody ? 'POST' : 'GET'),
        headers: { Accept: 'application/json', ...(args.requestBody ? { 'Content-Type': 'application/json' } : {}), ...args.headers },
        body: args.requestBody ? JSONInt.stringify(args.requestBody) : undefined,
        signal: AbortSignal.timeout(timeoutMs),
        redirect: 'error',
      });
    } catch (err) {
      throw new NetworkError(`mint unreachable: ${(err as Error).name}`, { cause: err });
    }
    let text: string;
    try {
      text = await res.text();
    } catch (err) {
      throw new NetworkError('mint connection broke', { cause: err });
    }
    let body: unknown;
    try {
      body = JSONInt.parse(text);
    } catch {
      throw new HttpResponseError('the mint answered something other than JSON', res.status);
    }
    if (!res.ok) {
      const b = body as { code?: unknown; detail?: unknown };
      if (typeof b?.code === 'number') throw new MintOperationError(b.code, typeof b.detail === 'string' ? b.detail : 'mint error');
      throw new HttpResponseError(`mint answered HTTP ${res.status}`, res.status);
    }
    return body;
  }) as RequestFn;
}

/** True when the mint gave a definite answer (it did not perform the operation); false when the outcome is unknown. */
export function isDefiniteRefusal(err: unknown): boolean {
  return err instanceof MintOperationError;
}

/** Map anything a mint call threw to the contract's codes; messages name no token or proof. */
export function toPaymentError(err: unknown): PaymentError {
  if (err instanceof PaymentError) return err;
  if (err instanceof MintOperationError) {
    if (err.code === NUT_PROOFS_SPENT) return new PaymentError('token_already_spent', 'the token was already spent');
    if (err.code === NUT_PROOFS_PENDING) return new PaymentError('token_pending', 'the token is pending at its mint; try again later');
    if (err.code === NUT_PROOF_VERIFICATION_FAILED || err.code === NUT_KEYSET_UNKNOWN)
      return new PaymentError('invalid_token', 'the mint does not recognise the token as its own');
    return new PaymentError('mint_error', `the mint refused (code ${err.code})`);
  }
  if (err instanceof NetworkError) return new PaymentError('mint_network_error', 'the mint could not be reached');
  if (err instanceof HttpResponseError) return new PaymentError('mint_error', `the mint failed (HTTP ${err.status})`);
  return new PaymentError('mint_error', 'the mint operation failed');
}

interface MintMetadata {
  mint: string;
  info: GetInfoResponse;
  keychain: KeyChainCache;
}

/** Per-mint metadata: from memory, else the wallet folder, else (only for whitelisted mints) the mint itself. */
export class MintDirectory {
  private readonly memory = new Map<string, MintMetadata>();
  private readonly refreshedAt = new Map<string, number>();

  constructor(
    private readonly store: WalletStore,
    private readonly request: RequestFn,
  ) {}

  cached(mint: string): MintMetadata | undefined {
    const known = this.memory.get(mint);
    if (known) return known;
    const onDisk = this.store.mintCache(mint) as MintMetadata | undefined;
    if (onDisk && onDisk.mint === mint && onDisk.info && onDisk.keychain) {
      this.memory.set(mint, onDisk);
      return onDisk;
    }
    return undefined;
  }

  /** Whether the metadata was fetched less than `ms` ago by this process: a token naming an unknown keyset then does not trigger another fetch. */
  refreshedWithin(mint: string, ms: number): boolean {
    return Date.now() - (this.refreshedAt.get(mint) ?? 0) < ms;
  }

  /** Fetch info, keysets and keys from the mint and cache them. The caller has checked the whitelist. */
  async refresh(mint: string): Promise<MintMetadata> {
    this.refreshedAt.set(mint, Date.now());
    const client = new Mint(mint, { customRequest: this.request });
    try {
      const info = await client.getInfo();
      const chain = new KeyChain(client, 'sat');
      await chain.init(true);
      const metadata = { mint, info, keychain: chain.cache };
      await this.store.putMintCache(mint, metadata);
      this.memory.set(mint, metadata);
      return metadata;
    } catch (err) {
      throw toPaymentError(err);
    }
  }

  async get(mint: string): Promise<MintMetadata> {
    return this.cached(mint) ?? this.refresh(mint);
  }

  /** Fee rate (`input_fee_ppk`) and unit of every keyset the mint has published. */
  keysets(metadata: MintMetadata): Array<{ id: string; unit: string; feePpk: number }> {
    return metadata.keychain.keysets.map((k) => ({ id: k.id, unit: k.unit, feePpk: k.input_fee_ppk ?? 0 }));
  }

  /** A cashu-ts wallet for one mint and unit, deriving outputs from `seed` with counters from `counters`. */
  wallet(metadata: MintMetadata, unit: PaymentUnit, seed: Uint8Array, counters: CounterSource): Wallet {
    const wallet = new Wallet(new Mint(metadata.mint, { customRequest: this.request }), {
      unit,
      bip39seed: seed,
      counterSource: counters,
      secretsPolicy: 'deterministic',
    });
    wallet.loadMintFromCache(metadata.info, metadata.keychain);
    return wallet;
  }
}
