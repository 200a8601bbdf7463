/**
 * Key handling: NIP-19 (nsec/npub) and hex parsing, and the provider's key file.
 *
 * Error messages never contain the input: a mistyped secret key is still mostly
 * a secret key, and error messages end up in logs.
 */
import { constants as fsc } from 'node:fs';
import { mkdir, open, writeFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import { generateSecretKey } from 'nostr-tools/pure';
import { decode, npubEncode, nsecEncode } from 'nostr-tools/nip19';
import { bytesToHex, hexToBytes } from '@noble/hashes/utils.js';
import { HEX64 } from '../util/hex.js';
import { fastPublicKey } from './fast-crypto.js';

export { generateSecretKey };

/** The secp256k1 group order: a valid secret key is in [1, N-1]. */
const CURVE_N = 0xfffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141n;

export class KeyFormatError extends Error {
  override name = 'KeyFormatError';
}

export class KeyFileError extends Error {
  override name = 'KeyFileError';
  constructor(message: string, readonly path: string) {
    super(message);
  }
}

function checkScalar(sk: Uint8Array): Uint8Array {
  const n = BigInt('0x' + bytesToHex(sk));
  if (sk.length !== 32 || n === 0n || n >= CURVE_N) {
    throw new KeyFormatError('secret key is out of range for secp256k1');
  }
  return sk;
}

/** nsec1… or 64 hex characters → 32-byte secret key. */
export function parseSecretKey(s: string): Uint8Array {
  if (typeof s !== 'string') throw new KeyFormatError('secret key must be a string');
  const t = s.trim();
  if (t.startsWith('nsec1')) {
    let decoded: ReturnType<typeof decode>;
    try {
      decoded = decode(t);
    } catch {
      throw new KeyFormatError('secret key looks like an nsec but does not decode (bad checksum or length)');
    }
    if (decoded.type !== 'nsec') throw new KeyFormatError('secret key must be an nsec');
    return checkScalar(decoded.data);
  }
  if (HEX64.test(t.toLowerCase())) return checkScalar(hexToBytes(t.toLowerCase()));
  throw new KeyFormatError('secret key must be an nsec1… string or 64 hex characters');
}

/** npub1… or 64 hex characters → lowercase hex public key (x-only, as Nostr uses). */
export function parsePublicKey(s: string): string {
  if (typeof s !== 'string') throw new KeyFormatError('public key must be a string');
  const t = s.trim();
  if (t.startsWith('npub1')) {
    let decoded: ReturnType<typeof decode>;
    try {
      decoded = decode(t);
    } catch {
      throw new KeyFormatError('public key looks like an npub but does not decode (bad checksum or length)');
    }
    if (decoded.type !== 'npub') throw new KeyFormatError('public key must be an npub');
    // bech32 carries any length: an npub of 20 bytes decodes fine and is no key.
    if (!HEX64.test(decoded.data)) throw new KeyFormatError('public key is an npub of the wrong length (must be 32 bytes)');
    return decoded.data;
  }
  if (t.startsWith('nsec1')) throw new KeyFormatError('expected a public key (npub) but got a secret key (nsec); never share an nsec');
  if (HEX64.test(t.toLowerCase())) return t.toLowerCase();
  throw new KeyFormatError('public key must be an npub1… string or 64 hex characters');
}

export function pubkeyOf(sk: Uint8Array): string {
  // Node's native secp256k1: nostr-tools' getPublicKey builds ~6 MB of JS precomputed tables on first use.
  return fastPublicKey(sk);
}

export function npubOf(pubkeyHexOrSk: string | Uint8Array): string {
  return npubEncode(typeof pubkeyHexOrSk === 'string' ? parsePublicKey(pubkeyHexOrSk) : pubkeyOf(pubkeyHexOrSk));
}

export function nsecOf(sk: Uint8Array): string {
  return nsecEncode(sk);
}

/**
 * Read a key file holding an nsec (64-hex accepted too). Refuses a file that
 * group or others can access, like ssh does for private keys: a readable
 * provider key lets any local user impersonate the provider.
 */
export async function readKeyFile(path: string): Promise<Uint8Array> {
  let fh;
  try {
    // O_NOFOLLOW: the permission check must be about the file we read, not a symlink.
    fh = await open(path, fsc.O_RDONLY | fsc.O_NOFOLLOW);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new KeyFileError(`key file ${path} does not exist; create it (e.g. with keygen) or let the agent create it`, path);
    if (code === 'ELOOP') throw new KeyFileError(`key file ${path} is a symlink; point the config at the real file`, path);
    throw new KeyFileError(`cannot open key file ${path}: ${code ?? (err as Error).message}`, path);
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw new KeyFileError(`key file ${path} is not a regular file`, path);
    const mode = st.mode & 0o777;
    if (mode & 0o077) {
      throw new KeyFileError(
        `key file ${path} has mode ${mode.toString(8).padStart(4, '0')}: group/other can access the secret key; fix with: chmod 600 ${path}`,
        path,
      );
    }
    const text = (await fh.readFile({ encoding: 'utf8' })).trim();
    try {
      return parseSecretKey(text);
    } catch (err) {
      throw new KeyFileError(`key file ${path} does not hold a valid key: ${(err as Error).message}`, path);
    }
  } finally {
    await fh.close();
  }
}

/**
 * Load the key file, or (with create) make a new key there: file 0600, parent
 * directory 0700 if we create it. An existing file is never overwritten.
 */
export async function loadOrCreateKeyFile(path: string, opts: { create: boolean }): Promise<Uint8Array> {
  if (opts.create) {
    const sk = generateSecretKey();
    await mkdir(dirname(path), { recursive: true, mode: 0o700 });
    try {
      // 'wx': fail if it exists (also closes the race with a concurrent creator); mode applies at creation.
      await writeFile(path, nsecOf(sk) + '\n', { flag: 'wx', mode: 0o600 });
      return sk;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') {
        throw new KeyFileError(`cannot create key file ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, path);
      }
    }
  }
  return readKeyFile(path);
}
