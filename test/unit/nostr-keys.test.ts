import { chmod, mkdtemp, mkdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { bytesToHex } from '@noble/hashes/utils.js';
import { npubEncode } from 'nostr-tools/nip19';
import {
  KeyFileError,
  generateSecretKey,
  loadOrCreateKeyFile,
  npubOf,
  nsecOf,
  parsePublicKey,
  parseSecretKey,
  pubkeyOf,
  readKeyFile,
} from '../../src/nostr/keys.js';

// NIP-19 test vector from the NIP itself.
const VEC_HEX_PUB = '7e7e9c42a91bfef19fa929e5fda1b72e0ebc1a4c1141673e2794234d86addf4e';
const VEC_NPUB = 'npub10elfcs4fr0l0r8af98jlmgdh9c8tcxjvz9qkw038js35mp4dma8qzvjptg';
const VEC_HEX_SK = '67dea2ed018072d675f5415ecfaed7d2597555e202d85b3d65ea4e58d2d92ffa';
const VEC_NSEC = 'nsec1vl029mgpspedva04g90vltkh6fvh240zqtv9k0t9af8935ke9laqsnlfe5';

describe('key parsing', () => {
  it('parses nsec and hex to the same bytes', () => {
    expect(bytesToHex(parseSecretKey(VEC_NSEC))).toBe(VEC_HEX_SK);
    expect(bytesToHex(parseSecretKey(VEC_HEX_SK.toUpperCase()))).toBe(VEC_HEX_SK);
    expect(bytesToHex(parseSecretKey(`  ${VEC_NSEC}\n`))).toBe(VEC_HEX_SK);
  });

  it('parses npub and hex public keys to lowercase hex', () => {
    expect(parsePublicKey(VEC_NPUB)).toBe(VEC_HEX_PUB);
    expect(parsePublicKey(VEC_HEX_PUB.toUpperCase())).toBe(VEC_HEX_PUB);
    expect(npubOf(VEC_HEX_PUB)).toBe(VEC_NPUB);
  });

  it('round-trips generated keys', () => {
    const sk = generateSecretKey();
    expect(parseSecretKey(nsecOf(sk))).toEqual(sk);
    expect(parsePublicKey(npubOf(sk))).toBe(pubkeyOf(sk));
  });

  it('rejects bad secret keys without echoing the input', () => {
    const secretish = VEC_NSEC.slice(0, -1) + 'x'; // bad checksum
    const bad = [secretish, VEC_HEX_SK.slice(1), 'hello', '', VEC_NPUB, '0'.repeat(64), 'f'.repeat(64)];
    for (const input of bad) {
      let msg = '';
      try {
        parseSecretKey(input);
      } catch (err) {
        msg = (err as Error).message;
      }
      expect(msg, `input #${bad.indexOf(input)}`).not.toBe('');
      if (input.length > 8) expect(msg).not.toContain(input);
    }
  });

  it('rejects an npub that does not hold 32 bytes', () => {
    const short = npubEncode('ab'.repeat(20));
    expect(() => parsePublicKey(short)).toThrow(/wrong length/);
  });

  it('rejects an nsec where a public key is expected', () => {
    expect(() => parsePublicKey(VEC_NSEC)).toThrow(/secret key/);
    expect(() => parsePublicKey('abc')).toThrow(/npub1/);
  });
});

describe('key file', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'pg-keys-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('creates an nsec file 0600 in a new 0700 directory, then loads the same key', async () => {
    const path = join(dir, 'sub', 'provider.nsec');
    const sk = await loadOrCreateKeyFile(path, { create: true });
    expect((await stat(path)).mode & 0o777).toBe(0o600);
    expect((await stat(join(dir, 'sub'))).mode & 0o777).toBe(0o700);
    expect((await readFile(path, 'utf8')).trim()).toBe(nsecOf(sk));
    expect(await loadOrCreateKeyFile(path, { create: true })).toEqual(sk);
    expect(await readKeyFile(path)).toEqual(sk);
  });

  it('does not create when create is false', async () => {
    const path = join(dir, 'missing.nsec');
    await expect(loadOrCreateKeyFile(path, { create: false })).rejects.toThrow(KeyFileError);
    await expect(stat(path)).rejects.toThrow();
  });

  it('refuses a group/other readable file and says how to fix it', async () => {
    const path = join(dir, 'k.nsec');
    await writeFile(path, nsecOf(generateSecretKey()) + '\n', { mode: 0o600 });
    await chmod(path, 0o644);
    const err = await readKeyFile(path).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(KeyFileError);
    expect((err as Error).message).toContain(`chmod 600 ${path}`);
    await expect(loadOrCreateKeyFile(path, { create: true })).rejects.toThrow(/chmod 600/);
    await chmod(path, 0o640);
    await expect(readKeyFile(path)).rejects.toThrow(/chmod 600/);
    await chmod(path, 0o600);
    await expect(readKeyFile(path)).resolves.toBeInstanceOf(Uint8Array);
  });

  it('refuses garbage content without echoing it', async () => {
    const path = join(dir, 'k.nsec');
    await writeFile(path, 'not-a-key-SECRETISH\n', { mode: 0o600 });
    const err = (await readKeyFile(path).catch((e: unknown) => e)) as Error;
    expect(err).toBeInstanceOf(KeyFileError);
    expect(err.message).not.toContain('SECRETISH');
  });

  it('refuses a symlink and a directory', async () => {
    const real = join(dir, 'real.nsec');
    await writeFile(real, nsecOf(generateSecretKey()), { mode: 0o600 });
    await symlink(real, join(dir, 'link.nsec'));
    await expect(readKeyFile(join(dir, 'link.nsec'))).rejects.toThrow(/symlink/);
    await mkdir(join(dir, 'd'));
    await expect(readKeyFile(join(dir, 'd'))).rejects.toThrow(KeyFileError);
  });
});
