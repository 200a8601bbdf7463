/**
 * The fast unwrap path must be an accelerator only: on random keys and wraps it
 * gives byte-identical results to nostr-tools, and it rejects exactly what
 * nostr-tools rejects (corrupted payloads, forged signatures, forged senders).
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { finalizeEvent, generateSecretKey, getEventHash, getPublicKey, verifyEvent } from 'nostr-tools/pure';
import * as nip04 from 'nostr-tools/nip04';
import * as nip17 from 'nostr-tools/nip17';
import * as nip44 from 'nostr-tools/nip44';
import { openDm, sealDm } from '../../src/nostr/dm.js';
import {
  fastConversationKey,
  fastEventHash,
  fastNip04Decrypt,
  fastNip44Encrypt,
  fastNip44Decrypt,
  fastPublicKey,
  sharedX,
  signEvent,
  signatureBackend,
  verifySignedEvent,
  wasVerified,
} from '../../src/nostr/fast-crypto.js';
import type { NostrEvent } from '../../src/nostr/types.js';

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const secretKeyArb = fc.constant(null).map(() => generateSecretKey());
const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=?#';
/**
 * Texts from each range of UTF-8 lengths (1 to 4 bytes), mixed, and around a
 * 16-byte AES block, run first in every property below that takes a text, so
 * a small number of random runs cannot miss a class.
 */
const TEXT_CLASSES = ['a', 'é', '中文', '😀', 'a é 中 😀 \u0000', 'x'.repeat(15), 'x'.repeat(16), 'x'.repeat(17)];

/** Outcome of a function as a comparable value: the result, or that it threw. */
function outcome<T>(f: () => T): { ok: true; value: T } | { ok: false } {
  try {
    return { ok: true, value: f() };
  } catch {
    return { ok: false };
  }
}

/** Replace one character of `s` by `c`. */
function mutate(s: string, at: number, c: string): string {
  const i = at % s.length;
  return s.slice(0, i) + c + s.slice(i + 1);
}

describe('fast crypto backend', () => {
  it('uses libsecp256k1 (WASM) for signatures', () => {
    // nostr-wasm ships with nostr-tools; if it stopped loading, the fast path would silently be gone.
    expect(signatureBackend).toBe('wasm');
  });
});

describe('conversation keys', () => {
  it('equal nip44.getConversationKey on random key pairs', () => {
    fc.assert(
      fc.property(secretKeyArb, secretKeyArb, (a, b) => {
        const pub = getPublicKey(b);
        expect(hex(fastConversationKey(a, pub))).toBe(hex(nip44.getConversationKey(a, pub)));
        // Twice: the second answer comes from the cache and must be the same bytes.
        expect(hex(fastConversationKey(a, pub))).toBe(hex(nip44.getConversationKey(a, pub)));
      }),
      { numRuns: 20 },
    );
  });

  it('are symmetric and match the NIP-44 test vector', () => {
    // From the NIP-44 spec vectors (get_conversation_key, first entry).
    const sec1 = Buffer.from('315e59ff51cb9209768cf7da80791ddcaae56ac9775eb25b6dee1234bc5d2268', 'hex');
    const pub2 = 'c2f9d9948dc8c7c38321e4b85c8558872eafa0641cd269db76848a6073e69133';
    expect(hex(fastConversationKey(sec1, pub2))).toBe('3dfef0ce2a4d80a25e7a328accf73448ef67096f65f79588e358d9a0eb9013f1');
    const a = generateSecretKey();
    const b = generateSecretKey();
    expect(hex(fastConversationKey(a, getPublicKey(b)))).toBe(hex(fastConversationKey(b, getPublicKey(a))));
  });

  it('throw where nostr-tools throws: x not on the curve, bad hex, bad secret key', () => {
    // x = 5 has no point on secp256k1 (x^3 + 7 = 132 is not a square mod p).
    const offCurve = '0000000000000000000000000000000000000000000000000000000000000005';
    const sk = generateSecretKey();
    expect(outcome(() => nip44.getConversationKey(sk, offCurve)).ok).toBe(false);
    expect(() => fastConversationKey(sk, offCurve)).toThrow();
    expect(() => sharedX(sk, 'zz')).toThrow();
    const zero = new Uint8Array(32);
    expect(outcome(() => nip44.getConversationKey(zero, getPublicKey(sk))).ok).toBe(false);
    expect(() => fastConversationKey(zero, getPublicKey(sk))).toThrow();
  });

  it('follow a secret key array that is overwritten in place', () => {
    const sk = generateSecretKey();
    const peer = getPublicKey(generateSecretKey());
    fastConversationKey(sk, peer);
    sk.set(generateSecretKey());
    expect(hex(fastConversationKey(sk, peer))).toBe(hex(nip44.getConversationKey(sk, peer)));
  });
});

describe('NIP-44 decrypt', () => {
  it('equals nip44.decrypt on random plaintexts, and rejects the same corrupted payloads', () => {
    fc.assert(
      fc.property(
        fc.string({ minLength: 1, maxLength: 600, unit: 'grapheme' }),
        fc.nat(),
        fc.constantFrom(...B64),
        (text, at, c) => {
          const key = nip44.getConversationKey(generateSecretKey(), getPublicKey(generateSecretKey()));
          const payload = nip44.encrypt(text, key);
          expect(fastNip44Decrypt(payload, key)).toBe(text);
          for (const bad of [mutate(payload, at, c), payload.slice(0, at % payload.length), `${payload}A`, `#${payload}`]) {
            expect(outcome(() => fastNip44Decrypt(bad, key))).toEqual(outcome(() => nip44.decrypt(bad, key)));
          }
          const otherKey = nip44.getConversationKey(generateSecretKey(), getPublicKey(generateSecretKey()));
          expect(() => fastNip44Decrypt(payload, otherKey)).toThrow();
        },
      ),
      { numRuns: 25, examples: TEXT_CLASSES.map((t, i): [string, number, string] => [t, i * 7, B64[i]!]) },
    );
  });

  it('handles the long-plaintext padding classes like nostr-tools', () => {
    const key = nip44.getConversationKey(generateSecretKey(), getPublicKey(generateSecretKey()));
    for (const n of [1, 32, 33, 255, 256, 257, 1000, 4096, 65_535]) {
      const text = 'é'.repeat(Math.ceil(n / 2)).slice(0, Math.max(1, Math.floor(n / 2)));
      const payload = nip44.encrypt(text, key);
      expect(fastNip44Decrypt(payload, key)).toBe(nip44.decrypt(payload, key));
    }
  });
});

describe('NIP-04 decrypt', () => {
  it('equals nip04.decrypt on random messages, and fails on the same corrupted ones', () => {
    fc.assert(
      fc.property(fc.string({ minLength: 0, maxLength: 300 }), fc.nat(), fc.constantFrom(...B64), (text, at, c) => {
        const a = generateSecretKey();
        const b = generateSecretKey();
        const payload = nip04.encrypt(a, getPublicKey(b), text);
        expect(fastNip04Decrypt(b, getPublicKey(a), payload)).toBe(nip04.decrypt(b, getPublicKey(a), payload));
        for (const bad of [mutate(payload, at, c), payload.slice(0, at % payload.length), payload.replace('?iv=', '')]) {
          const fast = outcome(() => fastNip04Decrypt(b, getPublicKey(a), bad));
          const slow = outcome(() => nip04.decrypt(b, getPublicKey(a), bad));
          expect(fast).toEqual(slow);
        }
      }),
      { numRuns: 25, examples: ['', ...TEXT_CLASSES].map((t, i): [string, number, string] => [t, i * 11, B64[B64.length - 1 - i]!]) },
    );
  });
});

/** A signed event as it arrives from JSON: plain fields, without the "verified" symbol finalizeEvent leaves. */
function signed(content: string, tags: string[][] = [], kind = 1): NostrEvent {
  return JSON.parse(JSON.stringify(finalizeEvent({ kind, created_at: Math.floor(Date.now() / 1000), tags, content }, generateSecretKey())));
}

describe('signature checks', () => {
  it('agree with nostr-tools on valid events and on every single-field forgery', () => {
    const fields = ['id', 'pubkey', 'sig', 'content', 'tags', 'created_at', 'kind'] as const;
    fc.assert(
      fc.property(fc.string({ maxLength: 400 }), fc.nat(), (content, n) => {
        const ev = signed(content, [['p', hex(generateSecretKey())]]);
        expect(verifySignedEvent({ ...ev })).toBe(true);
        // Every field forged in turn on the same signed event.
        for (const field of fields) {
          const forged: NostrEvent = { ...ev, tags: ev.tags.map((t) => [...t]) };
          switch (field) {
            case 'id':
            case 'pubkey':
            case 'sig': {
              const v = forged[field];
              const i = n % v.length;
              forged[field] = v.slice(0, i) + (v[i] === '0' ? '1' : '0') + v.slice(i + 1);
              break;
            }
            case 'content':
              forged.content = `${content}x`;
              break;
            case 'tags':
              forged.tags = [...forged.tags, ['e', 'x']];
              break;
            case 'created_at':
              forged.created_at += 1 + (n % 1000);
              break;
            case 'kind':
              forged.kind += 1;
              break;
          }
          expect(verifySignedEvent({ ...forged }), field).toBe(verifyEvent({ ...forged }));
          expect(verifySignedEvent({ ...forged }), field).toBe(false);
        }
      }),
      { numRuns: 20 },
    );
  });

  it('agree on events too big for the WASM heap (served by the JS verifier)', () => {
    const big = signed('\u0001'.repeat(100_000));
    expect(verifySignedEvent({ ...big })).toBe(true);
    expect(verifySignedEvent({ ...big, content: `${big.content}x` })).toBe(false);
  });

  it('agree on non-canonical shapes (uppercase hex, fractional timestamps)', () => {
    const ev = signed('hello');
    for (const odd of [
      { ...ev, sig: ev.sig.toUpperCase() },
      { ...ev, pubkey: ev.pubkey.toUpperCase() },
      { ...ev, id: ev.id.toUpperCase() },
      { ...ev, created_at: ev.created_at + 0.5 },
    ]) {
      expect(outcome(() => verifySignedEvent({ ...odd }))).toEqual(outcome(() => verifyEvent({ ...odd })));
    }
  });

  it('remember a verified object only while its signed fields stay unchanged', () => {
    const ev = signed('hello', [['p', 'a']]);
    expect(wasVerified(ev)).toBe(false);
    expect(verifySignedEvent(ev)).toBe(true);
    expect(wasVerified(ev)).toBe(true);
    ev.tags[0]![1] = 'b';
    expect(wasVerified(ev)).toBe(false);
    ev.tags[0]![1] = 'a';
    ev.content = 'bye';
    expect(wasVerified(ev)).toBe(false);
  });
});

describe('openDm on the fast path', () => {
  it('gives the same sender, content and rumor id as nip17.unwrapEvent on random wraps', () => {
    fc.assert(
      fc.property(fc.string({ minLength: 1, maxLength: 500 }), (text) => {
        const sender = generateSecretKey();
        const me = generateSecretKey();
        const mePub = getPublicKey(me);
        const wrap = nip17.wrapEvent(sender, { publicKey: mePub }, text);
        const reference = nip17.unwrapEvent(wrap, me);
        const opened = openDm(structuredClone(wrap), me, mePub);
        expect(opened.ok).toBe(true);
        if (!opened.ok) return;
        expect(opened.dm.sender).toBe(reference.pubkey);
        expect(opened.dm.content).toBe(reference.content);
        expect(opened.dm.requestId).toBe(reference.id);
        expect(opened.dm.createdAt).toBe(reference.created_at);
        expect(opened.dm.eventId).toBe(wrap.id);
      }),
      { numRuns: 12, examples: TEXT_CLASSES.map((t) => [t]) },
    );
  });

  it('rejects a wrap whose signature is broken, also after the pool had verified the unmodified object', () => {
    const me = generateSecretKey();
    const mePub = getPublicKey(me);
    const wrap = nip17.wrapEvent(generateSecretKey(), { publicKey: mePub }, 'hi') as NostrEvent;
    expect(verifySignedEvent(wrap)).toBe(true);
    expect(openDm(wrap, me, mePub).ok).toBe(true);
    // Same object, changed after the pool's check: the remembered verdict no longer applies.
    wrap.created_at -= 1;
    expect(openDm(wrap, me, mePub)).toEqual({ ok: false, reason: 'bad_signature' });
  });

  it('rejects a seal whose rumor claims another sender, as nostr-tools does', () => {
    const me = generateSecretKey();
    const mePub = getPublicKey(me);
    const attacker = generateSecretKey();
    const victim = getPublicKey(generateSecretKey());
    const rumor = { pubkey: victim, created_at: 1_700_000_000, kind: 14, tags: [['p', mePub]], content: 'spawn' };
    const seal = finalizeEvent(
      { kind: 13, created_at: 1_700_000_000, tags: [], content: nip44.encrypt(JSON.stringify(rumor), nip44.getConversationKey(attacker, mePub)) },
      attacker,
    );
    const eph = generateSecretKey();
    const wrap = finalizeEvent(
      { kind: 1059, created_at: 1_700_000_000, tags: [['p', mePub]], content: nip44.encrypt(JSON.stringify(seal), nip44.getConversationKey(eph, mePub)) },
      eph,
    );
    expect(() => nip17.unwrapEvent(wrap, me)).toThrow();
    expect(openDm(wrap, me, mePub)).toEqual({ ok: false, reason: 'forged_sender' });
  });

  it('opens NIP-04 DMs like nip04.decrypt', () => {
    const me = generateSecretKey();
    const sender = generateSecretKey();
    const content = nip04.encrypt(sender, getPublicKey(me), '{"type":"status"}');
    const ev = finalizeEvent({ kind: 4, created_at: 1_700_000_000, tags: [['p', getPublicKey(me)]], content }, sender);
    const opened = openDm(ev, me, getPublicKey(me));
    expect(opened).toMatchObject({ ok: true, dm: { content: nip04.decrypt(me, getPublicKey(sender), content), sender: getPublicKey(sender) } });
  });
});

describe('NIP-44 encrypt and event ids (the sealing side)', () => {
  it('encrypt equals nip44.encrypt byte for byte for the same nonce', () => {
    fc.assert(
      fc.property(fc.string({ minLength: 1, maxLength: 600, unit: 'grapheme' }), fc.uint8Array({ minLength: 32, maxLength: 32 }), (text, nonce) => {
        const key = nip44.getConversationKey(generateSecretKey(), getPublicKey(generateSecretKey()));
        expect(fastNip44Encrypt(text, key, nonce)).toBe(nip44.encrypt(text, key, nonce));
      }),
      { numRuns: 30, examples: TEXT_CLASSES.map((t, i): [string, Uint8Array] => [t, new Uint8Array(32).fill(i)]) },
    );
  });

  it('covers every padding class and hands nostr-tools what needs its extended prefix or its errors', () => {
    const key = nip44.getConversationKey(generateSecretKey(), getPublicKey(generateSecretKey()));
    const nonce = new Uint8Array(32).fill(7);
    for (const n of [1, 31, 32, 33, 64, 255, 256, 257, 1000, 4096, 65_535, 65_536, 70_000]) {
      const text = 'a'.repeat(n);
      expect(fastNip44Encrypt(text, key, nonce), `${n} bytes`).toBe(nip44.encrypt(text, key, nonce));
    }
    // A lone surrogate is encoded as U+FFFD by both.
    expect(fastNip44Encrypt('x\ud800y', key, nonce)).toBe(nip44.encrypt('x\ud800y', key, nonce));
    expect(outcome(() => fastNip44Encrypt('', key, nonce))).toEqual(outcome(() => nip44.encrypt('', key, nonce)));
    // Without a nonce it is random, and decrypts.
    const a = fastNip44Encrypt('same', key);
    expect(a).not.toBe(fastNip44Encrypt('same', key));
    expect(nip44.decrypt(a, key)).toBe('same');
  });

  it('event ids equal getEventHash', () => {
    fc.assert(
      fc.property(
        fc.string({ maxLength: 200, unit: 'grapheme' }),
        fc.array(fc.array(fc.string({ unit: 'grapheme' }), { maxLength: 3 }), { maxLength: 3 }),
        fc.nat({ max: 2 ** 32 }),
        (content, tags, created_at) => {
          const ev = { pubkey: getPublicKey(generateSecretKey()), created_at, kind: 14, tags, content };
          expect(fastEventHash(ev)).toBe(getEventHash(ev));
        },
      ),
      { numRuns: 100 },
    );
  });

  it('sealed DMs open with nip17.unwrapEvent', () => {
    const consumer = generateSecretKey();
    const provider = generateSecretKey();
    const wrap = sealDm({ sk: provider, recipient: getPublicKey(consumer), content: '{"type":"ready","é":"😀"}', channel: 'nip17', replyTo: 'ab'.repeat(32) });
    const rumor = nip17.unwrapEvent(wrap as never, consumer) as unknown as { pubkey: string; content: string; tags: string[][]; id: string };
    expect(rumor.pubkey).toBe(getPublicKey(provider));
    expect(rumor.content).toBe('{"type":"ready","é":"😀"}');
    expect(rumor.tags).toEqual([['p', getPublicKey(consumer)], ['e', 'ab'.repeat(32)]]);
    expect(rumor.id).toBe(getEventHash(rumor as never));
  });
});

describe('signEvent (libsecp256k1 signing)', () => {
  it('signs what nostr-tools verifies, with the id and pubkey nostr-tools computes', () => {
    fc.assert(
      fc.property(secretKeyArb, fc.string({ maxLength: 300 }), fc.array(fc.array(fc.string(), { maxLength: 3 }), { maxLength: 3 }), (sk, content, tags) => {
        const template = { kind: 1059, created_at: 1_700_000_000, tags, content };
        const ours = signEvent(template, sk);
        const theirs = finalizeEvent({ ...template, tags: tags.map((t) => [...t]) }, sk);
        expect(ours.pubkey).toBe(getPublicKey(sk));
        expect(ours.id).toBe(theirs.id);
        // A plain copy: nostr-tools must check the signature itself, not trust a cached verdict.
        expect(verifyEvent({ ...ours })).toBe(true);
        expect(fastPublicKey(sk)).toBe(getPublicKey(sk));
      }),
      { numRuns: 20 },
    );
  });

  it('a signature it makes does not verify for a changed event', () => {
    const ev = signEvent({ kind: 4, created_at: 1, tags: [['p', 'x']], content: 'hello' }, generateSecretKey());
    expect(verifyEvent({ ...ev, content: 'hellO' })).toBe(false);
  });

  it('throws for secret keys outside [1, n-1] instead of signing with them', () => {
    const n = Uint8Array.from(Buffer.from('fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141', 'hex'));
    for (const bad of [new Uint8Array(32), n, new Uint8Array(32).fill(0xff)]) {
      expect(() => signEvent({ kind: 1, created_at: 1, tags: [], content: '' }, bad)).toThrow();
    }
  });

  it('large events take the nostr-tools signer and still verify', () => {
    const ev = signEvent({ kind: 1, created_at: 1, tags: [], content: 'x'.repeat(100_000) }, generateSecretKey());
    expect(verifyEvent({ ...ev })).toBe(true);
  });
});
