/**
 * The fast path of DM unwrapping: the same answers as nostr-tools, computed by
 * native or WASM code instead of pure-JS BigInt arithmetic.
 *
 * - Conversation keys (NIP-44) and NIP-04 shared secrets: secp256k1 ECDH from
 *   libsecp256k1 (the `secp256k1` package's native addon; OpenSSL's
 *   `crypto.createECDH` when it cannot load), HKDF-extract with Node's HMAC. The
 *   ECDH object for a secret key is kept (its public key costs a scalar
 *   multiplication to set up), and NIP-44 keys per (secret key, peer) sit in a
 *   small LRU: a consumer's seals always yield the same key.
 * - Event signatures: libsecp256k1 compiled to WASM (`nostr-wasm`, a dependency
 *   of nostr-tools). Only events in canonical shape and of bounded size take
 *   it; everything else goes to nostr-tools' own `verifyEvent`, so the fast path
 *   can only ever accelerate, never change, an answer. The WASM heap cannot
 *   grow (~1 MB), hence the size bound.
 * - Events checked here are remembered (WeakMap, with a copy of every signed
 *   field), so a receive path that verified an event in the relay pool does not
 *   pay for it again in `openDm`; a later mutation of the object voids it.
 *
 * - Signing (replies, gift wraps): the same libsecp256k1, after Node's ECDH
 *   has checked the secret key (the WASM signer does not) and with its public
 *   key compared against Node's.
 *
 * Everything falls back to nostr-tools when a fast part is unavailable.
 * Byte-identity with nostr-tools is tested in test/unit/fast-unwrap.test.ts.
 *
 * Longer than the house's ~350 lines: each fast path sits beside the check
 * that it answers exactly as nostr-tools would, and its fallback.
 */
import { createCipheriv, createDecipheriv, createECDH, createHash, createHmac, randomBytes, timingSafeEqual, type ECDH } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
// nostr-tools' own base64 codec (its dependency): strict where Buffer's is lenient.
import { base64 } from '@scure/base';
import { finalizeEvent as jsFinalizeEvent, verifyEvent as jsVerifyEvent, type EventTemplate } from 'nostr-tools/pure';
import * as nip04 from 'nostr-tools/nip04';
import * as nip44 from 'nostr-tools/nip44';
import { HEX64, HEX128 } from '../util/hex.js';
import type { NostrEvent } from './types.js';

interface WasmVerifier {
  /** Throws unless id = sha256(serialised event) and sig is a valid BIP-340 signature of it by pubkey. */
  verifyEvent(event: object): void;
  /** Sets pubkey, id and sig on `event` (BIP-340 with fresh random aux data). Does not check the key. */
  finalizeEvent(event: { pubkey: string; id: string; sig: string; kind: number; created_at: number; tags: string[][]; content: string }, seckey: Uint8Array): void;
}

/**
 * nostr-wasm is loaded by name at run time: it is nostr-tools' own dependency,
 * and its type declarations reference DOM types this project does not load.
 */
async function loadWasm(): Promise<WasmVerifier | undefined> {
  if (process.env.PAYGRESS_NO_WASM === '1') return undefined;
  try {
    const name = 'nostr-wasm';
    const mod = (await import(name)) as {
      initNostrWasm: () => Promise<WasmVerifier>;
      NostrWasm: (bytes: Uint8Array) => Promise<WasmVerifier>;
    };
    const bytes = wasmBytes(name);
    return await (bytes ? mod.NostrWasm(bytes) : mod.initNostrWasm());
  } catch {
    return undefined;
  }
}

/**
 * The module's bytes, decoded by Buffer. nostr-wasm's own initNostrWasm decodes
 * its embedded base64 through `atob(..).split('').map(..)`: an array of ~220k
 * one-character strings that grows the heap by several MB, and V8 keeps those
 * pages, so an idle agent stays larger (docs/performance.md). undefined when the layout of the
 * (pinned) package is not the expected one: initNostrWasm is used then.
 */
function wasmBytes(name: string): Uint8Array | undefined {
  try {
    const file = createRequire(import.meta.url).resolve(name);
    const b64 = /\bsb64_data\s*=\s*"([A-Za-z0-9+/=]+)"/.exec(readFileSync(file, 'latin1'))?.[1];
    if (!b64) return undefined;
    const bytes = Buffer.from(b64, 'base64');
    return WebAssembly.validate(bytes) ? bytes : undefined;
  } catch {
    return undefined;
  }
}

const wasm: WasmVerifier | undefined = await loadWasm();

/** libsecp256k1's ECDH through the `secp256k1` package's native addon (prebuilt for linux-x64). */
interface NativeSecp256k1 {
  /** True when `seckey` is in [1, n-1]. */
  privateKeyVerify(seckey: Uint8Array): boolean;
  /** SEC1 public key of `seckey` (33 bytes when compressed). */
  publicKeyCreate(seckey: Uint8Array, compressed: boolean): Uint8Array;
  ecdh(pubkey: Uint8Array, seckey: Uint8Array, opts: { hashfn: (x: Uint8Array) => Uint8Array }, output: Uint8Array): Uint8Array;
}

/**
 * ~0.1 ms per ECDH against ~1-2 ms for OpenSSL's generic curve code, which
 * dominated unwrap time (two per gift wrap). Loaded by name at run time; when
 * the addon cannot load (another platform, PAYGRESS_NO_NATIVE=1), OpenSSL it is.
 *
 * In worker threads too, with one rule: the raw x coordinate comes back
 * through a JS callback that libsecp256k1 calls from C, and if the thread is
 * terminated from outside during an ECDH (Worker.terminate()) that callback's
 * exception cannot unwind through C and aborts the whole process. So unwrap
 * workers are never terminated while they work: they end themselves between
 * two events (unwrap-worker.ts).
 */
function loadNative(): NativeSecp256k1 | undefined {
  if (process.env.PAYGRESS_NO_NATIVE === '1') return undefined;
  try {
    return createRequire(import.meta.url)('secp256k1/bindings') as NativeSecp256k1;
  } catch {
    return undefined;
  }
}

const native = loadNative();

/** Which implementation computes ECDH shared secrets; for benchmarks and reports. */
export const ecdhBackend: 'libsecp256k1' | 'openssl' = native ? 'libsecp256k1' : 'openssl';

/** Shared x of sk·P for a compressed point; throws when P is not on the curve (both backends). */
function computeSharedX(state: KeyState, point: Buffer): Buffer {
  if (!native) return openssl(state).computeSecret(point);
  // hashfn returning x unchanged makes libsecp256k1 yield the raw x coordinate, as OpenSSL does.
  return Buffer.from(native.ecdh(point, state.sk, { hashfn: (x) => x }, Buffer.alloc(32)));
}

/** Which implementation `verifySignedEvent` uses for canonical events; for benchmarks and reports. */
export const signatureBackend: 'wasm' | 'js' = wasm ? 'wasm' : 'js';

// --- ECDH -------------------------------------------------------------------

const NIP44_SALT = Buffer.from('nip44-v2', 'utf8');
const CONVERSATION_CACHE_MAX = 512;

interface KeyState {
  /** Copy of the secret key: a caller may overwrite its array. */
  sk: Buffer;
  /** OpenSSL's ECDH object, made only when libsecp256k1 is not loaded (its set-up costs a scalar multiplication). */
  ecdh?: ECDH;
  /** x-only public key, hex, once asked for. */
  pubkey?: string;
  conversations: Map<string, Uint8Array>;
}

function openssl(state: KeyState): ECDH {
  if (!state.ecdh) {
    const ecdh = createECDH('secp256k1');
    ecdh.setPrivateKey(state.sk);
    state.ecdh = ecdh;
  }
  return state.ecdh;
}

const keyStates = new WeakMap<Uint8Array, KeyState>();

function keyState(sk: Uint8Array): KeyState {
  const known = keyStates.get(sk);
  if (known && known.sk.length === sk.length && timingSafeEqual(known.sk, sk)) return known;
  const state: KeyState = { sk: Buffer.from(sk), conversations: new Map() };
  // Throws for a secret key outside [1, n-1], as nostr-tools does.
  if (!native) openssl(state);
  else if (sk.length !== 32 || !native.privateKeyVerify(sk)) throw new Error('invalid secret key');
  keyStates.set(sk, state);
  return state;
}

/**
 * The x coordinate of sk·P, where P is the even-y point with x = `pubkeyHex`
 * (a Nostr key is x-only; prefix 02 makes it a compressed point).
 * Throws when the key is not 64 lowercase hex or not on the curve.
 */
export function sharedX(sk: Uint8Array, pubkeyHex: string): Buffer {
  if (!HEX64.test(pubkeyHex)) throw new Error('public key must be 64 lowercase hex characters');
  return computeSharedX(keyState(sk), Buffer.from(`02${pubkeyHex}`, 'hex'));
}

/** x-only public key (hex) of `sk`, from the cached native ECDH object. Equal to nostr-tools' `getPublicKey`. */
export function fastPublicKey(sk: Uint8Array): string {
  // Compressed SEC1: 02/03 prefix, then x.
  const state = keyState(sk);
  state.pubkey ??= native
    ? Buffer.from(native.publicKeyCreate(state.sk, true)).subarray(1).toString('hex')
    : openssl(state).getPublicKey(undefined, 'compressed').subarray(1).toString('hex');
  return state.pubkey;
}

/** NIP-44 v2 conversation key: HKDF-extract(salt = "nip44-v2", ikm = shared x). Equal to `nip44.getConversationKey`. */
export function fastConversationKey(sk: Uint8Array, pubkeyHex: string): Uint8Array {
  if (!HEX64.test(pubkeyHex)) return nip44.getConversationKey(sk, pubkeyHex);
  const state = keyState(sk);
  const hit = state.conversations.get(pubkeyHex);
  if (hit) {
    // Refresh its place: the map's insertion order is the LRU order.
    state.conversations.delete(pubkeyHex);
    state.conversations.set(pubkeyHex, hit);
    return hit.slice();
  }
  const shared = computeSharedX(state, Buffer.from(`02${pubkeyHex}`, 'hex'));
  const key = new Uint8Array(createHmac('sha256', NIP44_SALT).update(shared).digest());
  shared.fill(0);
  state.conversations.set(pubkeyHex, key);
  if (state.conversations.size > CONVERSATION_CACHE_MAX) {
    const oldest = state.conversations.keys().next().value;
    if (oldest !== undefined) state.conversations.delete(oldest);
  }
  return key.slice();
}

/**
 * NIP-04 decrypt with the shared secret from native ECDH; the AES-CBC part and
 * every check on the payload stay nostr-tools' own (`nip04.decrypt` derives the
 * same key; this only skips its BigInt scalar multiplication).
 */
export function fastNip04Decrypt(sk: Uint8Array, pubkeyHex: string, payload: string): string {
  if (!HEX64.test(pubkeyHex)) return nip04.decrypt(sk, pubkeyHex, payload);
  const key = sharedX(sk, pubkeyHex);
  try {
    return nip04DecryptWithKey(key, payload);
  } finally {
    key.fill(0);
  }
}

// nostr-tools' nip04 has no "decrypt with this key" entry point; its decrypt is
// key = x(sk·P) then AES-256-CBC. Node does the cipher; the payload checks are
// made to match nostr-tools exactly (tested on random and corrupted payloads).
function nip04DecryptWithKey(key: Uint8Array, payload: string): string {
  const [ctb64, ivb64] = payload.split('?iv=');
  // scure's base64 is strict (padding, alphabet); Buffer's is lenient. Use the same decoder as nostr-tools.
  const iv = base64.decode(ivb64 as string);
  const ciphertext = base64.decode(ctb64 as string);
  const decipher = createDecipheriv('aes-256-cbc', key, iv);
  const plain = Buffer.concat([decipher.update(ciphertext), decipher.final()]);
  return utf8.decode(plain);
}

// --- NIP-44 v2 decrypt -----------------------------------------------------------

/** RFC 5869 expand with SHA-256, `length` ≤ 255·32. The PRK is the conversation key. */
function hkdfExpand(prk: Uint8Array, info: Uint8Array, length: number): Buffer {
  const blocks: Buffer[] = [];
  let prev: Buffer = Buffer.alloc(0);
  for (let i = 1; blocks.length * 32 < length; i++) {
    prev = createHmac('sha256', prk).update(prev).update(info).update(Uint8Array.of(i)).digest();
    blocks.push(prev);
  }
  return Buffer.concat(blocks).subarray(0, length);
}


/**
 * `nip44.decrypt` (v2) with Node's HMAC and ChaCha20: the same checks in the
 * same order (length, version, base64 via the same strict codec, MAC in
 * constant time, padding), so it throws exactly where nostr-tools throws and
 * returns the same string otherwise.
 */
export function fastNip44Decrypt(payload: string, conversationKey: Uint8Array): string {
  if (typeof payload !== 'string') throw new Error('payload must be a valid string');
  if (payload.length < 132) throw new Error(`invalid payload length: ${payload.length}`);
  if (payload[0] === '#') throw new Error('unknown encryption version');
  const data = base64.decode(payload);
  if (data.length < 99) throw new Error(`invalid data length: ${data.length}`);
  if (data[0] !== 2) throw new Error(`unknown encryption version ${data[0]}`);
  const nonce = data.subarray(1, 33);
  const ciphertext = data.subarray(33, -32);
  const mac = data.subarray(-32);
  if (conversationKey.length !== 32) return nip44.decrypt(payload, conversationKey);

  const keys = hkdfExpand(conversationKey, nonce, 76);
  const chachaKey = keys.subarray(0, 32);
  const chachaNonce = keys.subarray(32, 44);
  const hmacKey = keys.subarray(44, 76);
  const expected = createHmac('sha256', hmacKey).update(nonce).update(ciphertext).digest();
  if (!timingSafeEqual(expected, mac)) throw new Error('invalid MAC');

  // OpenSSL's chacha20 takes a 16-byte IV: 32-bit little-endian block counter (0), then the 96-bit nonce.
  const iv = Buffer.concat([Buffer.alloc(4), chachaNonce]);
  const decipher = createDecipheriv('chacha20', chachaKey, iv);
  const padded = Buffer.concat([decipher.update(ciphertext), decipher.final()]);
  keys.fill(0);
  // Padding is byte work, no crypto: nostr-tools' own unpad, with its checks and errors.
  return nip44.v2.utils.unpad(padded);
}

const utf8 = new TextDecoder('utf-8');

/**
 * `nip44.encrypt` (v2) with Node's HMAC and ChaCha20: byte-identical for the
 * same nonce (tested). Padding is nostr-tools' own `pad`, which also raises its
 * errors for empty or oversized plaintexts; odd key or nonce sizes go to
 * nostr-tools whole.
 */
export function fastNip44Encrypt(plaintext: string, conversationKey: Uint8Array, nonce: Uint8Array = randomBytes(32)): string {
  if (conversationKey.length !== 32 || nonce.length !== 32) return nip44.encrypt(plaintext, conversationKey, nonce);
  const padded = nip44.v2.utils.pad(plaintext);
  const keys = hkdfExpand(conversationKey, nonce, 76);
  const cipher = createCipheriv('chacha20', keys.subarray(0, 32), Buffer.concat([Buffer.alloc(4), keys.subarray(32, 44)]));
  const ciphertext = Buffer.concat([cipher.update(padded), cipher.final()]);
  const mac = createHmac('sha256', keys.subarray(44, 76)).update(nonce).update(ciphertext).digest();
  keys.fill(0);
  return Buffer.concat([Uint8Array.of(2), nonce, ciphertext, mac]).toString('base64');
}

/** nostr-tools' `getEventHash` (sha256 of the NIP-01 serialisation) with OpenSSL's SHA-256. */
export function fastEventHash(ev: { pubkey: string; created_at: number; kind: number; tags: string[][]; content: string }): string {
  return createHash('sha256').update(JSON.stringify([0, ev.pubkey, ev.created_at, ev.kind, ev.tags, ev.content])).digest('hex');
}

// --- signatures ---------------------------------------------------------------

/**
 * Serialised events above this many UTF-16 units go to the JS verifier. JSON
 * escaping can grow a unit to 6 bytes; 32 Ki units stay well inside the WASM
 * heap (verified up to 300 kB serialised).
 */
const WASM_MAX_UNITS = 32 * 1024;

interface Fingerprint {
  id: string;
  pubkey: string;
  sig: string;
  kind: number;
  created_at: number;
  content: string;
  tags: string;
}

const verified = new WeakMap<object, Fingerprint>();

function fingerprint(ev: NostrEvent): Fingerprint {
  return {
    id: ev.id,
    pubkey: ev.pubkey,
    sig: ev.sig,
    kind: ev.kind,
    created_at: ev.created_at,
    content: ev.content,
    tags: JSON.stringify(ev.tags),
  };
}

function sameFingerprint(a: Fingerprint, b: Fingerprint): boolean {
  return (
    a.id === b.id && a.pubkey === b.pubkey && a.sig === b.sig && a.kind === b.kind &&
    a.created_at === b.created_at && a.content === b.content && a.tags === b.tags
  );
}

function isCanonical(ev: NostrEvent): boolean {
  if (typeof ev !== 'object' || ev === null) return false;
  if (typeof ev.id !== 'string' || !HEX64.test(ev.id)) return false;
  if (typeof ev.pubkey !== 'string' || !HEX64.test(ev.pubkey)) return false;
  if (typeof ev.sig !== 'string' || !HEX128.test(ev.sig)) return false;
  if (!Number.isSafeInteger(ev.kind) || ev.kind < 0) return false;
  if (!Number.isSafeInteger(ev.created_at) || ev.created_at < 0) return false;
  if (typeof ev.content !== 'string' || !Array.isArray(ev.tags)) return false;
  let units = ev.content.length;
  for (const t of ev.tags) {
    if (!Array.isArray(t)) return false;
    for (const v of t) {
      if (typeof v !== 'string') return false;
      units += v.length + 3;
    }
  }
  return units <= WASM_MAX_UNITS;
}

/**
 * `verifyEvent` with nostr-tools' answers (true/false, and the same throw for
 * events it cannot serialise), faster. A true answer is remembered for this
 * exact object and field values (see `wasVerified`).
 */
export function verifySignedEvent(ev: NostrEvent): boolean {
  let ok: boolean;
  if (wasm && isCanonical(ev)) {
    try {
      wasm.verifyEvent(signedFields(ev));
      ok = true;
    } catch {
      ok = false;
    }
  } else {
    ok = jsVerifyEvent(signedFields(ev));
  }
  if (ok) verified.set(ev, fingerprint(ev));
  return ok;
}

/**
 * A fresh object with the signed fields only: nostr-tools caches its verdict
 * in a symbol on the event (which a spread would copy), and that verdict
 * would outlive a mutation of the caller's object.
 */
function signedFields(ev: NostrEvent): NostrEvent {
  return { id: ev.id, pubkey: ev.pubkey, sig: ev.sig, kind: ev.kind, created_at: ev.created_at, content: ev.content, tags: ev.tags };
}

/** Whether `verifySignedEvent` said true for this object, with every signed field unchanged since. */
export function wasVerified(ev: NostrEvent): boolean {
  const fp = verified.get(ev);
  if (!fp) return false;
  try {
    return sameFingerprint(fp, fingerprint(ev));
  } catch {
    return false;
  }
}

/**
 * `finalizeEvent` of nostr-tools (pubkey, id and BIP-340 signature over a copy
 * of `template`), signed by libsecp256k1 where available. The secret key is
 * validated by Node's ECDH first, and the public key libsecp256k1 derived must
 * equal Node's, so a bad key throws instead of yielding a garbage signature.
 */
export function signEvent(template: EventTemplate, sk: Uint8Array): NostrEvent {
  const pubkey = fastPublicKey(sk);
  const ev: NostrEvent = {
    kind: template.kind,
    created_at: template.created_at,
    tags: template.tags,
    content: template.content,
    pubkey,
    id: '',
    sig: '',
  };
  if (!wasm || !isCanonical({ ...ev, id: '0'.repeat(64), sig: '0'.repeat(128) })) {
    const signed = jsFinalizeEvent({ kind: ev.kind, created_at: ev.created_at, tags: ev.tags, content: ev.content }, sk);
    return { id: signed.id, pubkey: signed.pubkey, sig: signed.sig, kind: signed.kind, created_at: signed.created_at, tags: signed.tags, content: signed.content };
  }
  wasm.finalizeEvent(ev, sk);
  if (ev.pubkey !== pubkey) throw new Error('secret key rejected by the signer');
  return ev;
}
