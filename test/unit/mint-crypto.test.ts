/**
 * The cryptography the test mint signs with and the wallet derives with,
 * checked against the NUT test vectors (cashubtc/nuts, tests/00-tests.md,
 * tests/02-tests.md, tests/12-tests.md, tests/13-tests.md at commit
 * 3ddb1ae767b50859a0f346947479451027404dae). A mint or wallet built on these
 * primitives computes what every other Cashu implementation computes.
 */
import { pbkdf2Sync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { bytesToHex, hexToBytes } from '@noble/hashes/utils.js';
import {
  blindMessage,
  createBlindSignature,
  createDLEQProof,
  deriveBlindingFactor,
  deriveKeysetId,
  deriveSecret,
  hashToCurve,
  pointFromHex,
  verifyDLEQProof,
} from '@cashu/cashu-ts';

describe('NUT-00: BDHKE', () => {
  it('hash_to_curve matches the vectors', () => {
    const vectors: Array<[string, string]> = [
      ['0000000000000000000000000000000000000000000000000000000000000000', '024cce997d3b518f739663b757deaec95bcd9473c30a14ac2fd04023a739d1a725'],
      ['0000000000000000000000000000000000000000000000000000000000000001', '022e7158e11c9506f1aa4248bf531298daa7febd6194f003edcd9b93ade6253acf'],
      ['0000000000000000000000000000000000000000000000000000000000000002', '026cdbe15362df59cd1dd3c9c11de8aedac2106eca69236ecd9fbe117af897be4f'],
    ];
    for (const [message, point] of vectors) expect(hashToCurve(hexToBytes(message)).toHex(true)).toBe(point);
  });

  it('blinded messages B_ = Y + rG match the vectors', () => {
    const vectors: Array<[string, string, string]> = [
      ['d341ee4871f1f889041e63cf0d3823c713eea6aff01e80f1719f08f9e5be98f6', '99fce58439fc37412ab3468b73db0569322588f62fb3a49182d67e23d877824a', '033b1a9737a40cc3fd9b6af4b723632b76a67a36782596304612a6c2bfb5197e6d'],
      ['f1aaf16c2239746f369572c0784d9dd3d032d952c2d992175873fb58fae31a60', 'f78476ea7cc9ade20f9e05e58a804cf19533f03ea805ece5fee88c8e2874ba50', '029bdf2d716ee366eddf599ba252786c1033f47e230248a4612a5670ab931f1763'],
    ];
    for (const [x, r, B_] of vectors) expect(blindMessage(hexToBytes(x), BigInt(`0x${r}`)).B_.toHex(true)).toBe(B_);
  });

  it("the mint's blind signatures C_ = kB_ match the vectors", () => {
    const B_ = pointFromHex('02a9acc1e48c25eeeb9289b5031cc57da9fe72f3fe2861d264bdc074209b107ba2');
    const vectors: Array<[string, string]> = [
      ['0000000000000000000000000000000000000000000000000000000000000001', '02a9acc1e48c25eeeb9289b5031cc57da9fe72f3fe2861d264bdc074209b107ba2'],
      ['7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f', '0398bc70ce8184d27ba89834d19f5199c84443c31131e48d3c1214db24247d005d'],
    ];
    for (const [k, C_] of vectors) expect(createBlindSignature(B_, hexToBytes(k), '00').C_.toHex(true)).toBe(C_);
  });
});

describe('NUT-02: keyset ids', () => {
  it('derives the version-1 id of the vector keyset', () => {
    const keys = {
      '1': '03a40f20667ed53513075dc51e715ff2046cad64eb68960632269ba7f0210e38bc',
      '2': '03fd4ce5a16b65576145949e6f99f445f8249fee17c606b688b504a849cdc452de',
      '4': '02648eccfa4c026960966276fa5a4cae46ce0fd432211a4f449bf84f13aa5f8303',
      '8': '02fdfd6796bfeac490cbee12f778f867f0a2c68f6508d17c649759ea0dc3547528',
    };
    expect(deriveKeysetId(keys, { versionByte: 0 })).toBe('00456a94ab4e1c46');
  });
});

describe('NUT-12: DLEQ proofs', () => {
  it("the mint's deterministic DLEQ proof matches the vector and verifies", () => {
    const a = hexToBytes('0000000000000000000000000000000000000000000000000000000000000002');
    const A = pointFromHex('02c6047f9441ed7d6d3045406e95c07cd85c778e4b8cef3ca7abac09b95c709ee5');
    const B_ = pointFromHex('02a9acc1e48c25eeeb9289b5031cc57da9fe72f3fe2861d264bdc074209b107ba2');
    const C_ = pointFromHex('0244eccfc7a348274458bb38044c7f3c389b3c2086c7ec18b5812d2877ab937787');
    const proof = createDLEQProof(B_, a);
    expect(bytesToHex(proof.e)).toBe('2a16ffee280aff3c429045607f9b8e0bf8b35910c44c1b20b9dfaf01b263d7b3');
    expect(bytesToHex(proof.s)).toBe('9df27731238334718d120d4f74611a7c668233f988e687ac3fb188f0a34a2dab');
    expect(verifyDLEQProof(proof, B_, C_, A)).toBe(true);
  });

  it('accepts the valid BlindSignature vector and refuses it with s changed', () => {
    const A = pointFromHex('0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798');
    const B_ = pointFromHex('02a9acc1e48c25eeeb9289b5031cc57da9fe72f3fe2861d264bdc074209b107ba2');
    const C_ = pointFromHex('02a9acc1e48c25eeeb9289b5031cc57da9fe72f3fe2861d264bdc074209b107ba2');
    const e = hexToBytes('9818e061ee51d5c8edc3342369a554998ff7b4381c8652d724cdf46429be73d9');
    const s = hexToBytes('9818e061ee51d5c8edc3342369a554998ff7b4381c8652d724cdf46429be73da');
    expect(verifyDLEQProof({ e, s }, B_, C_, A)).toBe(true);
    const badS = hexToBytes('9818e061ee51d5c8edc3342369a554998ff7b4381c8652d724cdf46429be73db');
    expect(verifyDLEQProof({ e, s: badS }, B_, C_, A)).toBe(false);
  });
});

describe('NUT-13: deterministic secrets (what the provider wallet restores from)', () => {
  // BIP39 mnemonic → seed is PBKDF2-HMAC-SHA512(mnemonic, "mnemonic", 2048 rounds, 64 bytes).
  const seed = new Uint8Array(
    pbkdf2Sync('half depart obvious quality work element tank gorilla view sugar picture humble', 'mnemonic', 2048, 64, 'sha512'),
  );

  it('derives the version-1 secrets and blinding factors of the vectors', () => {
    const secrets = [
      '485875df74771877439ac06339e284c3acfcd9be7abf3bc20b516faeadfe77ae',
      '8f2b39e8e594a4056eb1e6dbb4b0c38ef13b1b2c751f64f810ec04ee35b77270',
      'bc628c79accd2364fd31511216a0fab62afd4a18ff77a20deded7b858c9860c8',
    ];
    const factors = [
      'ad00d431add9c673e843d4c2bf9a778a5f402b985b8da2d5550bf39cda41d679',
      '967d5232515e10b81ff226ecf5a9e2e2aff92d66ebc3edf0987eb56357fd6248',
      'b20f47bb6ae083659f3aa986bfa0435c55c6d93f687d51a01f26862d9b9a4899',
    ];
    for (let counter = 0; counter < 3; counter++) {
      expect(bytesToHex(deriveSecret(seed, '009a1f293253e41e', counter))).toBe(secrets[counter]);
      expect(bytesToHex(deriveBlindingFactor(seed, '009a1f293253e41e', counter))).toBe(factors[counter]);
    }
  });

  it('derives the version-2 secrets of the vectors', () => {
    const id = '015ba18a8adcd02e715a58358eb618da4a4b3791151a4bee5e968bb88406ccf76a';
    expect(bytesToHex(deriveSecret(seed, id, 0))).toBe('db5561a07a6e6490f8dadeef5be4e92f7cebaecf2f245356b5b2a4ec40687298');
    expect(bytesToHex(deriveSecret(seed, id, 4))).toBe('5e89fc5d30d0bf307ddf0a3ac34aa7a8ee3702169dafa3d3fe1d0cae70ecd5ef');
  });
});
