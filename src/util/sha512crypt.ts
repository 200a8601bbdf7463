/**
 * SHA-512 crypt (`$6$salt$hash`), the glibc algorithm as specified in
 * Ulrich Drepper's "Unix crypt using SHA-256 and SHA-512". cloud-init's
 * `chpasswd ... type: hash` takes this format, so the plaintext password never
 * has to be written anywhere. Pure: no I/O besides the CSPRNG in `randomSalt`.
 *
 * The driver hashes through the system libcrypt (password-hasher.ts); this is
 * its reference and its fallback, and what its answers are checked against.
 * SHA-512 is OpenSSL's (node:crypto), not a JS implementation, and each round
 * hashes one contiguous buffer with the one-shot `hash()`: the 5000 rounds run
 * on the event loop, so each call's overhead counts (docs/performance.md).
 */
import { createHash, hash, randomBytes } from 'node:crypto';

export const SHA512CRYPT_DEFAULT_ROUNDS = 5000;
export const SHA512CRYPT_MIN_ROUNDS = 1000;
export const SHA512CRYPT_MAX_ROUNDS = 999_999_999;
const SALT_MAX = 16;

/** crypt's base-64 alphabet (not RFC 4648's). */
const ITOA64 = './0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';

/** Byte triples of the final digest, in the order the spec encodes them. */
const ENCODE_ORDER: ReadonlyArray<readonly [number, number, number]> = [
  [0, 21, 42], [22, 43, 1], [44, 2, 23], [3, 24, 45], [25, 46, 4], [47, 5, 26], [6, 27, 48],
  [28, 49, 7], [50, 8, 29], [9, 30, 51], [31, 52, 10], [53, 11, 32], [12, 33, 54], [34, 55, 13],
  [56, 14, 35], [15, 36, 57], [37, 58, 16], [59, 17, 38], [18, 39, 60], [40, 61, 19], [62, 20, 41],
];

function sha512(data: Uint8Array): Buffer {
  return hash('sha512', data, 'buffer');
}

/** `len` bytes made of `digest` repeated (steps 16 and 20 of the spec). */
function stretch(digest: Uint8Array, len: number): Uint8Array {
  const out = new Uint8Array(len);
  for (let i = 0; i < len; i++) out[i] = digest[i % 64]!;
  return out;
}

function b64From24(b2: number, b1: number, b0: number, n: number): string {
  let w = (b2 << 16) | (b1 << 8) | b0;
  let s = '';
  for (let i = 0; i < n; i++) {
    s += ITOA64[w & 0x3f];
    w >>>= 6;
  }
  return s;
}

/**
 * Hash `key` with `salt`. `rounds` undefined → 5000 and no `rounds=` field in
 * the output (glibc's default form); given → clamped to [1000, 999999999] and
 * written out. Salts longer than 16 characters are truncated, as glibc does.
 */
export function sha512crypt(key: string, salt: string, rounds?: number): string {
  if (/[$:\n\r\0]/.test(salt)) throw new RangeError('salt may not contain $, :, NUL or newlines');
  if (rounds !== undefined && !Number.isInteger(rounds)) throw new RangeError('rounds must be an integer');
  const r = rounds === undefined
    ? SHA512CRYPT_DEFAULT_ROUNDS
    : Math.min(SHA512CRYPT_MAX_ROUNDS, Math.max(SHA512CRYPT_MIN_ROUNDS, rounds));
  const enc = new TextEncoder();
  const K = enc.encode(key);
  const S = enc.encode(salt).subarray(0, SALT_MAX);
  const saltStr = new TextDecoder().decode(S);

  // Digest B = H(key salt key).
  const B = createHash('sha512').update(K).update(S).update(K).digest();
  // Digest A = H(key salt B-stretched-to-keylen, then key-length bits picking B or key).
  const a = createHash('sha512').update(K).update(S).update(stretch(B, K.length));
  for (let n = K.length; n > 0; n >>= 1) a.update(n & 1 ? B : K);
  const A = a.digest();
  // P: H(key repeated keylen times), stretched to keylen.
  const dp = createHash('sha512');
  for (let i = 0; i < K.length; i++) dp.update(K);
  const P = stretch(dp.digest(), K.length);
  // S': H(salt repeated 16 + A[0] times), stretched to saltlen.
  const ds = createHash('sha512');
  for (let i = 0; i < 16 + A[0]!; i++) ds.update(S);
  const SS = stretch(ds.digest(), S.length);

  // Each round hashes [P|C] [S'] [P] [C|P], laid out in one reused buffer.
  const buf = new Uint8Array(2 * Math.max(64, P.length) + P.length + SS.length);
  let C: Uint8Array = A;
  for (let i = 0; i < r; i++) {
    let o = 0;
    const first = i & 1 ? P : C;
    buf.set(first, o);
    o += first.length;
    if (i % 3) {
      buf.set(SS, o);
      o += SS.length;
    }
    if (i % 7) {
      buf.set(P, o);
      o += P.length;
    }
    const last = i & 1 ? C : P;
    buf.set(last, o);
    o += last.length;
    C = sha512(buf.subarray(0, o));
  }
  buf.fill(0);
  P.fill(0);

  let out = '';
  for (const [x, y, z] of ENCODE_ORDER) out += b64From24(C[x]!, C[y]!, C[z]!, 4);
  out += b64From24(0, 0, C[63]!, 2);
  const roundsField = rounds === undefined ? '' : `rounds=${r}$`;
  return `$6$${roundsField}${saltStr}$${out}`;
}

/** A random salt over crypt's alphabet. 256 is a multiple of 64, so `byte & 63` is unbiased. */
export function randomSalt(length = SALT_MAX): string {
  const bytes = randomBytes(length);
  let s = '';
  for (const b of bytes) s += ITOA64[b & 0x3f];
  return s;
}

/** Hash a password for `chpasswd ... type: hash` with a fresh 16-character salt and default rounds. */
export function hashPassword(password: string, rounds?: number): string {
  return sha512crypt(password, randomSalt(), rounds);
}
