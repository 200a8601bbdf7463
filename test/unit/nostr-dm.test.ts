import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { finalizeEvent, generateSecretKey, getEventHash, getPublicKey } from 'nostr-tools/pure';
import * as nip04 from 'nostr-tools/nip04';
import * as nip17 from 'nostr-tools/nip17';
import * as nip44 from 'nostr-tools/nip44';
import { createRumor, createSeal, createWrap } from 'nostr-tools/nip59';
import { openDm, sealDm, sealDmRequest, type OpenResult } from '../../src/nostr/dm.js';
import type { NostrEvent } from '../../src/nostr/types.js';

const me = generateSecretKey();
const mePub = getPublicKey(me);
const alice = generateSecretKey();
const alicePub = getPublicKey(alice);

/** What a relay would hand us: a plain JSON copy with no cached verification flag. */
const wire = (ev: NostrEvent): NostrEvent => JSON.parse(JSON.stringify(ev)) as NostrEvent;

function reason(r: OpenResult): string {
  return r.ok ? 'ok' : r.reason;
}

function wrapSeal(seal: NostrEvent, recipient: string): NostrEvent {
  return createWrap(seal, recipient);
}

describe('openDm / sealDm round trips', () => {
  it('NIP-17: our wrap opens, with the rumor id as request id and the e tag on replies', () => {
    const wrap = sealDm({ sk: alice, recipient: mePub, content: '{"hello":"world"}', channel: 'nip17', replyTo: 'ab'.repeat(32) });
    expect(wrap.kind).toBe(1059);
    expect(wrap.pubkey).not.toBe(alicePub);
    expect(wrap.tags).toEqual([['p', mePub]]);
    const r = openDm(wire(wrap), me, mePub);
    expect(r.ok).toBe(true);
    if (!r.ok) return;
    expect(r.dm).toMatchObject({ sender: alicePub, content: '{"hello":"world"}', channel: 'nip17', eventId: wrap.id });
    expect(r.dm.requestId).toMatch(/^[0-9a-f]{64}$/);
    expect(r.dm.requestId).not.toBe(wrap.id);
    // nostr-tools (an independent unwrapper) agrees on rumor id and tags.
    const rumor = nip17.unwrapEvent(wire(wrap), me);
    expect(rumor.id).toBe(r.dm.requestId);
    expect(rumor.tags).toEqual([['p', mePub], ['e', 'ab'.repeat(32)]]);
    expect(Math.abs(r.dm.createdAt - Date.now() / 1000)).toBeLessThan(60);
  });

  it('sealDmRequest returns the id the recipient sees as requestId, on both channels', () => {
    for (const channel of ['nip17', 'nip04'] as const) {
      const { event, requestId } = sealDmRequest({ sk: alice, recipient: mePub, content: 'req', channel });
      const r = openDm(wire(event), me, mePub);
      expect(r.ok && r.dm.requestId).toBe(requestId);
    }
  });

  it('NIP-17: opens a wrap made by nostr-tools', () => {
    const wrap = nip17.wrapEvent(alice, { publicKey: mePub }, 'from nostr-tools');
    const r = openDm(wire(wrap), me, mePub);
    expect(r.ok && r.dm.content).toBe('from nostr-tools');
    expect(r.ok && r.dm.sender).toBe(alicePub);
  });

  it('NIP-04: round trip, and nostr-tools can decrypt ours', () => {
    const ev = sealDm({ sk: alice, recipient: mePub, content: 'ping ✓', channel: 'nip04', replyTo: 'cd'.repeat(32) });
    expect(ev.kind).toBe(4);
    expect(ev.tags).toEqual([['p', mePub], ['e', 'cd'.repeat(32)]]);
    expect(nip04.decrypt(me, alicePub, ev.content)).toBe('ping ✓');
    const r = openDm(wire(ev), me, mePub);
    expect(r).toEqual({
      ok: true,
      dm: { eventId: ev.id, requestId: ev.id, sender: alicePub, content: 'ping ✓', channel: 'nip04', createdAt: ev.created_at },
    });
  });
});

describe('openDm rejections', () => {
  it('a wrap for someone else is not_for_us (both channels)', () => {
    const other = getPublicKey(generateSecretKey());
    expect(reason(openDm(wire(sealDm({ sk: alice, recipient: other, content: 'x', channel: 'nip17' })), me, mePub))).toBe('not_for_us');
    expect(reason(openDm(wire(sealDm({ sk: alice, recipient: other, content: 'x', channel: 'nip04' })), me, mePub))).toBe('not_for_us');
  });

  it('a wrap tagged for us but encrypted to another key fails to decrypt', () => {
    const other = getPublicKey(generateSecretKey());
    const wrap = wire(sealDm({ sk: alice, recipient: other, content: 'x', channel: 'nip17' }));
    // Re-sign with our p tag so only the encryption is wrong.
    const eph = generateSecretKey();
    const retagged = finalizeEvent({ kind: 1059, created_at: wrap.created_at, tags: [['p', mePub]], content: wrap.content }, eph);
    expect(reason(openDm(wire(retagged), me, mePub))).toBe('decrypt_failed');
  });

  it('a seal signed by A whose rumor claims B is forged_sender', () => {
    const bob = generateSecretKey(); // the impersonated sender
    const rumor = createRumor({ kind: 14, content: 'I am bob', tags: [['p', mePub]] }, bob);
    const seal = createSeal(rumor, alice, mePub); // signed by alice, rumor.pubkey = bob
    expect(seal.pubkey).toBe(alicePub);
    expect(rumor.pubkey).toBe(getPublicKey(bob));
    expect(reason(openDm(wire(wrapSeal(seal, mePub)), me, mePub))).toBe('forged_sender');
  });

  it('tampered outer signature or content is bad_signature', () => {
    const wrap = wire(sealDm({ sk: alice, recipient: mePub, content: 'x', channel: 'nip17' }));
    const flip = (s: string): string => (s[0] === '0' ? '1' : '0') + s.slice(1);
    expect(reason(openDm({ ...wrap, sig: flip(wrap.sig) }, me, mePub))).toBe('bad_signature');
    expect(reason(openDm({ ...wrap, content: wrap.content.slice(0, -4) + 'AAA=' }, me, mePub))).toBe('bad_signature');
    // Mutating a freshly signed object must not ride on nostr-tools' cached "verified" flag.
    const fresh = sealDm({ sk: alice, recipient: mePub, content: 'x', channel: 'nip04' });
    fresh.content = nip04.encrypt(alice, mePub, 'swapped');
    expect(reason(openDm(fresh, me, mePub))).toBe('bad_signature');
  });

  it('a seal with a broken signature is bad_signature', () => {
    const rumor = createRumor({ kind: 14, content: 'x', tags: [] }, alice);
    const seal = wire(createSeal(rumor, alice, mePub));
    const forged = { ...seal, sig: '00'.repeat(64) };
    expect(reason(openDm(wire(wrapSeal(forged, mePub)), me, mePub))).toBe('bad_signature');
  });

  it('garbage inside the seal is bad_shape or decrypt_failed, never a throw', () => {
    const convKey = nip44.getConversationKey(alice, mePub);
    const cases: string[] = [
      nip44.encrypt('this is not json', convKey),
      nip44.encrypt('[1,2,3]', convKey),
      nip44.encrypt('{"pubkey":"' + alicePub + '","kind":14}', convKey),
      nip44.encrypt('null', convKey),
      'not even nip44',
    ];
    for (const content of cases) {
      const seal = finalizeEvent({ kind: 13, created_at: 1_700_000_000, tags: [], content }, alice);
      const r = openDm(wire(wrapSeal(seal, mePub)), me, mePub);
      expect(['bad_shape', 'decrypt_failed']).toContain(reason(r));
    }
  });

  it('a rumor whose id does not match its content is bad_shape; a non-14 rumor is unsupported_kind', () => {
    const rumor = createRumor({ kind: 14, content: 'x', tags: [] }, alice);
    const lying = { ...rumor, content: 'changed' };
    const convKey = nip44.getConversationKey(alice, mePub);
    const seal = finalizeEvent({ kind: 13, created_at: 1_700_000_000, tags: [], content: nip44.encrypt(JSON.stringify(lying), convKey) }, alice);
    expect(reason(openDm(wire(wrapSeal(seal, mePub)), me, mePub))).toBe('bad_shape');
    const noId: Record<string, unknown> = { ...rumor, content: 'changed' };
    delete noId.id;
    const seal2 = finalizeEvent({ kind: 13, created_at: 1_700_000_000, tags: [], content: nip44.encrypt(JSON.stringify(noId), convKey) }, alice);
    const r2 = openDm(wire(wrapSeal(seal2, mePub)), me, mePub);
    expect(r2.ok && r2.dm.requestId).toBe(getEventHash(noId as unknown as Parameters<typeof getEventHash>[0]));
    const file = createRumor({ kind: 15, content: 'x', tags: [] }, alice);
    expect(reason(openDm(wire(wrapSeal(createSeal(file, alice, mePub), mePub)), me, mePub))).toBe('unsupported_kind');
  });

  it('NIP-04 with bad base64, bad IV or bad padding is decrypt_failed', () => {
    const good = nip04.encrypt(alice, mePub, 'hello world, a message longer than one block');
    const [ct, iv] = good.split('?iv=') as [string, string];
    // 44-byte message → 48 bytes with PKCS#7 pad value 4. In CBC the last plaintext byte is
    // D(C_last) xor C_prev: xor-ing 4 into C_prev's last byte makes the pad byte 0 (never valid).
    const zeroPadByte = (b64: string): string => {
      const bytes = Buffer.from(b64, 'base64');
      bytes[bytes.length - 17]! ^= 4;
      return bytes.toString('base64');
    };
    const contents = [
      '!!!not base64!!!?iv=' + iv,
      ct + '?iv=AAAA', // 3-byte IV
      ct + '?iv=###',
      ct, // no IV at all
      ct.slice(0, -24) + '?iv=' + iv, // truncated: not a whole block / bad padding
      zeroPadByte(ct) + '?iv=' + iv, // whole blocks, last plaintext byte forced to 0: invalid PKCS#7
      '',
    ];
    for (const content of contents) {
      const ev = finalizeEvent({ kind: 4, created_at: 1_700_000_000, tags: [['p', mePub]], content }, alice);
      expect(reason(openDm(wire(ev), me, mePub)), JSON.stringify(content)).toBe('decrypt_failed');
    }
  });

  it('other kinds and non-events are rejected without throwing', () => {
    const note = finalizeEvent({ kind: 1, created_at: 1_700_000_000, tags: [['p', mePub]], content: 'hi' }, alice);
    expect(reason(openDm(wire(note), me, mePub))).toBe('unsupported_kind');
    for (const junk of [null, undefined, 42, 'str', [], {}, { kind: 1059 }]) {
      expect(reason(openDm(junk as unknown as NostrEvent, me, mePub))).toBe('bad_shape');
    }
  });
});

describe('openDm is total', () => {
  const hex = (n: number) => fc.string({ unit: fc.constantFrom(...'0123456789abcdef'), minLength: n, maxLength: n });
  const eventish = fc.record(
    {
      id: fc.oneof(hex(64), fc.string(), fc.integer()),
      pubkey: fc.oneof(hex(64), fc.constant(alicePub), fc.string()),
      sig: fc.oneof(hex(128), fc.string()),
      kind: fc.oneof(fc.constantFrom(4, 13, 14, 1059), fc.integer(), fc.double(), fc.string()),
      created_at: fc.oneof(fc.nat(), fc.integer(), fc.double(), fc.string()),
      content: fc.oneof(fc.string(), fc.base64String(), fc.constant('abc?iv=def'), fc.integer()),
      tags: fc.oneof(
        fc.array(fc.array(fc.string(), { maxLength: 3 }), { maxLength: 3 }),
        fc.constant([['p', mePub]]),
        fc.anything(),
      ),
    },
    { requiredKeys: [] },
  );

  it('never throws on random event-shaped input', () => {
    fc.assert(
      fc.property(fc.oneof(eventish, fc.anything()), (input) => {
        const r = openDm(input as unknown as NostrEvent, me, mePub);
        expect(typeof r.ok).toBe('boolean');
      }),
      { numRuns: 2000 },
    );
  });

  it('never throws when a valid wrap is mutated', () => {
    const base = wire(sealDm({ sk: alice, recipient: mePub, content: 'x', channel: 'nip17' }));
    fc.assert(
      fc.property(fc.constantFrom('id', 'pubkey', 'sig', 'content', 'created_at', 'kind'), fc.anything(), (key, value) => {
        fc.pre(!Object.is(value, (base as unknown as Record<string, unknown>)[key]));
        const r = openDm({ ...base, [key]: value } as unknown as NostrEvent, me, mePub);
        expect(r.ok).toBe(false);
      }),
      { numRuns: 300 },
    );
  });
});
