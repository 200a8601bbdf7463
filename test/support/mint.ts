/**
 * A Cashu mint for tests: a test double with real cryptography. A real HTTP
 * server on 127.0.0.1 serving the NUT endpoints wallets use — info (NUT-06),
 * keys and keysets (NUT-01/02, with `input_fee_ppk`), swap (NUT-03), mint
 * quotes paid at once with a fake bolt11 (NUT-04), checkstate (NUT-07),
 * restore (NUT-09) — signing with cashu-ts's mint-side primitives (BDHKE and
 * DLEQ proofs, NUT-00/12), checked against the NUT test vectors in
 * test/unit/mint-crypto.test.ts. What it simulates: Lightning (quotes are
 * paid on creation) and persistence (state lives in memory).
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { randomBytes } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { bytesToHex } from '@noble/hashes/utils.js';
import {
  createBlindSignature,
  createDLEQProof,
  createNewMintKeys,
  getEncodedToken,
  hashToCurve,
  pointFromHex,
  verifyUnblindedSignature,
  Wallet,
} from '@cashu/cashu-ts';

export type MintUnit = 'sat' | 'msat' | 'usd';

export interface TestMintOptions {
  port?: number;
  /** Units with one active keyset each; default sat. */
  units?: MintUnit[];
  /** `input_fee_ppk` of every keyset; default 0. */
  inputFeePpk?: number;
  /** Attach a DLEQ proof to every signature (NUT-12); default true. */
  dleq?: boolean;
  /** NUT-02 keyset id version: 1 (`01…`, HMAC-derived wallet secrets, what current mints publish; default) or 0 (`00…`, BIP32). */
  keysetVersion?: 0 | 1;
}

export interface LoggedRequest {
  method: string;
  path: string;
}

interface Keyset {
  id: string;
  unit: MintUnit;
  inputFeePpk: number;
  privKeys: Record<string, Uint8Array>;
  pubKeys: Record<string, string>;
}

interface BlindedMessage {
  amount: number;
  id: string;
  B_: string;
}

interface SerializedSignature {
  amount: number;
  id: string;
  C_: string;
  dleq?: { e: string; s: string };
}

interface InputProof {
  amount: number;
  id: string;
  secret: string;
  C: string;
}

class MintError extends Error {
  constructor(
    readonly code: number,
    readonly detail: string,
  ) {
    super(detail);
  }
}

export class TestMint {
  readonly keysets: Keyset[];
  /** Every request that reached the mint, in order. */
  readonly requests: LoggedRequest[] = [];
  /** While true, swaps answer "proofs are pending" (11002) and checkstate says PENDING for their inputs. */
  pending = false;
  /** Called after a swap's inputs are marked spent and outputs signed, before the answer goes out; throwing DropConnection drops the connection. */
  afterSwap: (() => void) | undefined;
  private readonly spent = new Set<string>();
  private readonly pendingYs = new Set<string>();
  /** B_ → signature, for NUT-09 restore and to refuse signing the same output twice. */
  private readonly signed = new Map<string, SerializedSignature>();
  private readonly quotes = new Map<string, { amount: number; unit: MintUnit; issued: boolean }>();
  private server: Server | undefined;
  private baseUrl = '';
  private readonly dleq: boolean;

  constructor(private readonly options: TestMintOptions = {}) {
    const feePpk = options.inputFeePpk ?? 0;
    this.dleq = options.dleq ?? true;
    this.keysets = (options.units ?? ['sat']).map((unit) => {
      const pair = createNewMintKeys(32, randomBytes(32), { unit, input_fee_ppk: feePpk, versionByte: options.keysetVersion ?? 1 });
      const pubKeys: Record<string, string> = {};
      for (const [amount, key] of Object.entries(pair.pubKeys)) pubKeys[amount] = bytesToHex(key);
      return { id: pair.keysetId, unit, inputFeePpk: feePpk, privKeys: pair.privKeys, pubKeys };
    });
  }

  get url(): string {
    return this.baseUrl;
  }

  async start(): Promise<string> {
    const server = createServer((req, res) => void this.handle(req, res));
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.options.port ?? 0, '127.0.0.1', () => resolve());
    });
    this.baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    return this.baseUrl;
  }

  async stop(): Promise<void> {
    const server = this.server;
    if (!server) return;
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  /** Ends the "pending" simulation: proofs held pending become unspent again. */
  settlePending(): void {
    this.pending = false;
    this.pendingYs.clear();
  }

  /** NUT-07 state of one proof secret, as the mint sees it. */
  stateOf(secret: string): 'UNSPENT' | 'PENDING' | 'SPENT' {
    const y = yOf(secret);
    if (this.spent.has(y)) return 'SPENT';
    return this.pendingYs.has(y) ? 'PENDING' : 'UNSPENT';
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const path = (req.url ?? '/').split('?')[0] ?? '/';
    this.requests.push({ method: req.method ?? 'GET', path });
    try {
      const body = req.method === 'POST' ? await readJson(req) : undefined;
      const answer = this.route(req.method ?? 'GET', path, body);
      if (answer === undefined) return send(res, 404, { detail: 'not found' });
      send(res, 200, answer);
    } catch (err) {
      if (err instanceof MintError) return send(res, 400, { code: err.code, detail: err.detail });
      if (err instanceof DropConnection) return void res.socket?.destroy();
      send(res, 400, { code: 10000, detail: 'bad request' });
    }
  }

  private route(method: string, path: string, body: unknown): unknown {
    if (method === 'GET' && path === '/v1/info') return this.info();
    if (method === 'GET' && path === '/v1/keysets')
      return { keysets: this.keysets.map((k) => ({ id: k.id, unit: k.unit, active: true, input_fee_ppk: k.inputFeePpk })) };
    if (method === 'GET' && path === '/v1/keys') return { keysets: this.keysets.map(keysOf) };
    if (method === 'GET' && path.startsWith('/v1/keys/')) {
      const keyset = this.keysets.find((k) => k.id === path.slice('/v1/keys/'.length));
      if (!keyset) throw new MintError(12001, 'Keyset is not known');
      return { keysets: [keysOf(keyset)] };
    }
    if (method === 'POST' && path === '/v1/swap') return this.swap(body as { inputs: InputProof[]; outputs: BlindedMessage[] });
    if (method === 'POST' && path === '/v1/checkstate') return this.checkstate(body as { Ys: string[] });
    if (method === 'POST' && path === '/v1/restore') return this.restore(body as { outputs: BlindedMessage[] });
    if (method === 'POST' && path === '/v1/mint/quote/bolt11') return this.createQuote(body as { amount: number; unit: MintUnit });
    if (method === 'GET' && path.startsWith('/v1/mint/quote/bolt11/')) return this.quoteState(path.slice('/v1/mint/quote/bolt11/'.length));
    if (method === 'POST' && path === '/v1/mint/bolt11') return this.mintTokens(body as { quote: string; outputs: BlindedMessage[] });
    return undefined;
  }

  private info(): unknown {
    const units = this.keysets.map((k) => k.unit);
    return {
      name: 'paygress-agent test mint',
      version: 'test-mint/1',
      nuts: {
        '4': { methods: units.map((unit) => ({ method: 'bolt11', unit })), disabled: false },
        '5': { methods: [], disabled: true },
        '7': { supported: true },
        '9': { supported: true },
        '12': { supported: this.dleq },
      },
    };
  }

  private swap(body: { inputs: InputProof[]; outputs: BlindedMessage[] }): unknown {
    const inputs = body.inputs;
    const outputs = body.outputs;
    if (!Array.isArray(inputs) || !Array.isArray(outputs) || inputs.length === 0) throw new MintError(10000, 'bad request');
    const ys = inputs.map((p) => yOf(p.secret));
    if (new Set(ys).size !== ys.length) throw new MintError(11007, 'Duplicate inputs provided');
    const units = new Set<MintUnit>();
    let fee = 0;
    let inputSum = 0;
    for (const proof of inputs) {
      const keyset = this.keysetById(proof.id);
      const key = keyset.privKeys[String(proof.amount)];
      if (!key) throw new MintError(10001, 'Proof verification failed');
      const ok = verifyUnblindedSignature(
        { C: pointFromHex(proof.C), secret: new TextEncoder().encode(proof.secret), id: proof.id },
        key,
      );
      if (!ok) throw new MintError(10001, 'Proof verification failed');
      units.add(keyset.unit);
      fee += keyset.inputFeePpk;
      inputSum += proof.amount;
    }
    for (const y of ys) {
      if (this.spent.has(y)) throw new MintError(11001, 'Proofs already spent');
      if (this.pendingYs.has(y)) throw new MintError(11002, 'Proofs are pending');
    }
    if (this.pending) {
      for (const y of ys) this.pendingYs.add(y);
      throw new MintError(11002, 'Proofs are pending');
    }
    const outputUnits = new Set(outputs.map((o) => this.keysetById(o.id).unit));
    if (units.size > 1) throw new MintError(11009, 'Inputs/Outputs of multiple units');
    if ([...outputUnits].some((u) => !units.has(u))) throw new MintError(11010, 'Inputs and outputs not of same unit');
    const outputSum = outputs.reduce((sum, o) => sum + o.amount, 0);
    if (inputSum - Math.ceil(fee / 1000) !== outputSum) throw new MintError(11005, 'Transaction is not balanced (inputs != outputs)');
    const signatures = this.signAll(outputs);
    // Synchronous from here: inputs are spent and outputs signed in one step, as one database transaction would.
    for (const y of ys) this.spent.add(y);
    for (const [i, output] of outputs.entries()) this.signed.set(output.B_, signatures[i]!);
    this.afterSwap?.();
    return { signatures };
  }

  private checkstate(body: { Ys: string[] }): unknown {
    return {
      states: body.Ys.map((Y) => ({
        Y,
        state: this.spent.has(Y) ? 'SPENT' : this.pendingYs.has(Y) ? 'PENDING' : 'UNSPENT',
        witness: null,
      })),
    };
  }

  private restore(body: { outputs: BlindedMessage[] }): unknown {
    const outputs: BlindedMessage[] = [];
    const signatures: SerializedSignature[] = [];
    for (const output of body.outputs) {
      const signature = this.signed.get(output.B_);
      if (!signature) continue;
      outputs.push(output);
      signatures.push(signature);
    }
    return { outputs, signatures, promises: signatures };
  }

  private createQuote(body: { amount: number; unit: MintUnit }): unknown {
    if (!this.keysets.some((k) => k.unit === body.unit)) throw new MintError(11013, 'Unit in request is not supported');
    if (!Number.isSafeInteger(body.amount) || body.amount <= 0) throw new MintError(11006, 'Amount outside of limit range');
    const quote = randomBytes(16).toString('hex');
    this.quotes.set(quote, { amount: body.amount, unit: body.unit, issued: false });
    return this.quoteState(quote);
  }

  private quoteState(id: string): unknown {
    const quote = this.quotes.get(id);
    if (!quote) throw new MintError(20000, 'Quote not found');
    return {
      quote: id,
      request: fakeBolt11(quote.amount, quote.unit),
      amount: quote.amount,
      unit: quote.unit,
      state: quote.issued ? 'ISSUED' : 'PAID',
      expiry: Math.floor(Date.now() / 1000) + 3600,
    };
  }

  private mintTokens(body: { quote: string; outputs: BlindedMessage[] }): unknown {
    const quote = this.quotes.get(body.quote);
    if (!quote) throw new MintError(20000, 'Quote not found');
    if (quote.issued) throw new MintError(20002, 'Quote has already been issued');
    const sum = body.outputs.reduce((s, o) => s + o.amount, 0);
    if (sum !== quote.amount) throw new MintError(11005, 'Transaction is not balanced');
    if (body.outputs.some((o) => this.keysetById(o.id).unit !== quote.unit)) throw new MintError(11010, 'Inputs and outputs not of same unit');
    const signatures = this.signAll(body.outputs);
    quote.issued = true;
    for (const [i, output] of body.outputs.entries()) this.signed.set(output.B_, signatures[i]!);
    return { signatures };
  }

  private signAll(outputs: BlindedMessage[]): SerializedSignature[] {
    const seen = new Set<string>();
    return outputs.map((output) => {
      if (seen.has(output.B_)) throw new MintError(11008, 'Duplicate outputs provided');
      seen.add(output.B_);
      if (this.signed.has(output.B_)) throw new MintError(11003, 'Outputs already signed');
      const keyset = this.keysetById(output.id);
      const key = keyset.privKeys[String(output.amount)];
      if (!key) throw new MintError(11006, 'Amount outside of limit range');
      const B_ = pointFromHex(output.B_);
      const signature = createBlindSignature(B_, key, keyset.id);
      const serialized: SerializedSignature = { amount: output.amount, id: keyset.id, C_: signature.C_.toHex(true) };
      if (this.dleq) {
        const proof = createDLEQProof(B_, key);
        serialized.dleq = { e: bytesToHex(proof.e), s: bytesToHex(proof.s) };
      }
      return serialized;
    });
  }

  private keysetById(id: string): Keyset {
    const keyset = this.keysets.find((k) => k.id === id);
    if (!keyset) throw new MintError(12001, 'Keyset is not known');
    return keyset;
  }
}

/** Thrown from `afterSwap` to make the mint drop the connection after it has done the swap. */
export class DropConnection extends Error {}

const BECH32 = 'qpzry9x8gf2tvdw0s3jn54khce6mua7l';

/** A bolt11-looking request: cashu-ts checks only that the amount prefix matches (`lnbcrt<sat*10>n1…`). */
function fakeBolt11(amount: number, unit: MintUnit): string {
  const sats = unit === 'msat' ? Math.ceil(amount / 1000) : amount;
  // The data part must use bech32 characters: wallets find the amount before the last '1'.
  const data = [...randomBytes(40)].map((b) => BECH32[b % 32]).join('');
  return `lnbcrt${sats * 10}n1p${data}`;
}

function keysOf(keyset: Keyset): unknown {
  return { id: keyset.id, unit: keyset.unit, active: true, input_fee_ppk: keyset.inputFeePpk, keys: keyset.pubKeys };
}

function yOf(secret: string): string {
  return hashToCurve(new TextEncoder().encode(secret)).toHex(true);
}

function readJson(req: IncomingMessage): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => {
      try {
        resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')));
      } catch (err) {
        reject(err);
      }
    });
    req.on('error', reject);
  });
}

function send(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

/** A consumer's token of `amount`, minted by a cashu-ts wallet at `from` (its quotes are paid at once). */
export async function consumerToken(from: TestMint, amount: number, unit: MintUnit = 'sat'): Promise<string> {
  const wallet = new Wallet(from.url, { unit });
  await wallet.loadMint();
  const quote = await wallet.createMintQuoteBolt11(amount);
  const proofs = await wallet.mintProofsBolt11(amount, quote);
  return getEncodedToken({ mint: from.url, unit, proofs });
}
