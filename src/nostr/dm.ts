/**
 * Direct messages in and out: NIP-17 (gift wrap 1059 → seal 13 → rumor 14) and
 * legacy NIP-04 (kind 4). Pure crypto, no I/O.
 *
 * `openDm` is total: whatever a relay sends, it returns a reason instead of
 * throwing, so one hostile event can never take the receive loop down.
 */
import { generateSecretKey } from 'nostr-tools/pure';
import * as nip04 from 'nostr-tools/nip04';
import {
  fastConversationKey,
  fastEventHash,
  fastNip44Encrypt,
  fastNip04Decrypt,
  fastNip44Decrypt,
  fastPublicKey,
  signEvent,
  verifySignedEvent,
  wasVerified,
} from './fast-crypto.js';
import { HEX64 } from '../util/hex.js';
import { isTags, isTimestamp, parseSignedEvent } from './event-shape.js';
import { parsePublicKey } from './keys.js';
import type { DmChannel, IncomingDm, NostrEvent } from './types.js';

export type OpenFailure =
  | 'not_for_us'
  | 'bad_signature'
  | 'forged_sender'
  | 'decrypt_failed'
  | 'bad_shape'
  | 'unsupported_kind';

export type OpenResult = { ok: true; dm: IncomingDm } | { ok: false; reason: OpenFailure };

export const KIND_NIP04_DM = 4;
export const KIND_SEAL = 13;
export const KIND_PRIVATE_DM = 14;
export const KIND_GIFT_WRAP = 1059;

/** NIP-59 randomises seal and wrap timestamps up to two days into the past. */
export const TWO_DAYS = 2 * 24 * 60 * 60;

/**
 * The subscription for DMs to `pubkey` on either channel: gift wraps are
 * back-dated up to TWO_DAYS, so `since` must reach that far back plus the
 * caller's slack (kind 4 is not back-dated; one filter keeps it simple).
 */
export function dmFilter(pubkey: string, slackSeconds: number): { kinds: number[]; '#p': string[]; since: number } {
  return { kinds: [KIND_GIFT_WRAP, KIND_NIP04_DM], '#p': [pubkey], since: Math.floor(Date.now() / 1000) - TWO_DAYS - slackSeconds };
}

/**
 * The single place a NIP-44 conversation key (secp256k1 ECDH + HKDF-extract) is
 * computed. It dominates unwrap cost (two per gift wrap), so it is Node's
 * native ECDH (fast-crypto.ts), byte-identical to `nip44.getConversationKey`.
 */
function conversationKey(sk: Uint8Array, pubkeyHex: string): Uint8Array {
  return fastConversationKey(sk, pubkeyHex);
}

function isTaggedFor(ev: NostrEvent, pubkey: string): boolean {
  return ev.tags.some((t) => t[0] === 'p' && t[1] === pubkey);
}

type Step<T> = { ok: true; value: T } | { ok: false; reason: OpenFailure };

function nip44Open(payload: string, sk: Uint8Array, senderPubkey: string): Step<unknown> {
  let plaintext: string;
  try {
    plaintext = fastNip44Decrypt(payload, conversationKey(sk, senderPubkey));
  } catch {
    return { ok: false, reason: 'decrypt_failed' };
  }
  try {
    return { ok: true, value: JSON.parse(plaintext) as unknown };
  } catch {
    return { ok: false, reason: 'bad_shape' };
  }
}

function openGiftWrap(wrap: NostrEvent, sk: Uint8Array, signatureChecked: boolean): OpenResult {
  if (!signatureChecked && !verifySignedEvent(wrap)) return { ok: false, reason: 'bad_signature' };

  const sealStep = nip44Open(wrap.content, sk, wrap.pubkey);
  if (!sealStep.ok) return sealStep;
  const seal = parseSignedEvent(sealStep.value);
  if (!seal || seal.kind !== KIND_SEAL) return { ok: false, reason: 'bad_shape' };
  if (!verifySignedEvent(seal)) return { ok: false, reason: 'bad_signature' };

  const rumorStep = nip44Open(seal.content, sk, seal.pubkey);
  if (!rumorStep.ok) return rumorStep;
  const r = rumorStep.value;
  if (typeof r !== 'object' || r === null || Array.isArray(r)) return { ok: false, reason: 'bad_shape' };
  const rumor = r as Record<string, unknown>;
  if (typeof rumor.pubkey !== 'string' || !HEX64.test(rumor.pubkey)) return { ok: false, reason: 'bad_shape' };
  if (typeof rumor.kind !== 'number' || !isTimestamp(rumor.created_at)) return { ok: false, reason: 'bad_shape' };
  if (typeof rumor.content !== 'string' || !isTags(rumor.tags)) return { ok: false, reason: 'bad_shape' };
  // The seal's signature authenticates the sender; a rumor claiming anyone else is forged.
  if (rumor.pubkey !== seal.pubkey) return { ok: false, reason: 'forged_sender' };
  if (rumor.kind !== KIND_PRIVATE_DM) return { ok: false, reason: 'unsupported_kind' };

  const unsigned = {
    pubkey: rumor.pubkey,
    created_at: rumor.created_at,
    kind: rumor.kind,
    tags: rumor.tags,
    content: rumor.content,
  };
  const id = fastEventHash(unsigned);
  if (rumor.id !== undefined && rumor.id !== id) return { ok: false, reason: 'bad_shape' };

  return {
    ok: true,
    dm: {
      eventId: wrap.id,
      requestId: id,
      sender: seal.pubkey,
      content: rumor.content,
      channel: 'nip17',
      createdAt: rumor.created_at,
    },
  };
}

function openNip04(ev: NostrEvent, sk: Uint8Array, signatureChecked: boolean): OpenResult {
  if (!signatureChecked && !verifySignedEvent(ev)) return { ok: false, reason: 'bad_signature' };
  let content: string;
  try {
    content = fastNip04Decrypt(sk, ev.pubkey, ev.content);
  } catch {
    return { ok: false, reason: 'decrypt_failed' };
  }
  return {
    ok: true,
    dm: {
      eventId: ev.id,
      requestId: ev.id,
      sender: ev.pubkey,
      content,
      channel: 'nip04',
      createdAt: ev.created_at,
    },
  };
}

/**
 * Authenticate and decrypt a DM addressed to `myPubkey`. Cheap checks (shape,
 * kind, p tag) come before signature checks and ECDH, so events that are not
 * for us cost next to nothing. The outer signature is not checked again when
 * this very object was verified unchanged (the relay pool does it), or when
 * the caller says so: `signatureChecked` is for an unwrap worker whose event
 * is a copy of one the main thread verified.
 */
export function openDm(event: NostrEvent, sk: Uint8Array, myPubkey: string, opts: { signatureChecked?: boolean } = {}): OpenResult {
  try {
    const ev = parseSignedEvent(event);
    if (!ev) return { ok: false, reason: 'bad_shape' };
    if (ev.kind !== KIND_GIFT_WRAP && ev.kind !== KIND_NIP04_DM) return { ok: false, reason: 'unsupported_kind' };
    if (!isTaggedFor(ev, myPubkey)) return { ok: false, reason: 'not_for_us' };
    const checked = opts.signatureChecked === true || wasVerified(event);
    return ev.kind === KIND_GIFT_WRAP ? openGiftWrap(ev, sk, checked) : openNip04(ev, sk, checked);
  } catch {
    // Belt and braces: everything above is meant not to throw.
    return { ok: false, reason: 'bad_shape' };
  }
}

function randomPast(now: number): number {
  return now - Math.floor(Math.random() * TWO_DAYS);
}

export interface SealDmOptions {
  sk: Uint8Array;
  /** npub or hex. */
  recipient: string;
  content: string;
  channel: DmChannel;
  /** Request id this message answers: the rumor id (NIP-17) or event id (NIP-04). */
  replyTo?: string;
}

/**
 * Build the event to publish and the id the recipient will know the message by
 * (`IncomingDm.requestId` on their side): the rumor id for NIP-17, the event id
 * for NIP-04. A client keeps `requestId` to match replies that name it.
 * Throws only on caller error (bad recipient key).
 */
export function sealDmRequest(opts: SealDmOptions): { event: NostrEvent; requestId: string } {
  const recipient = parsePublicKey(opts.recipient);
  const tags: string[][] = [['p', recipient]];
  if (opts.replyTo !== undefined) tags.push(['e', opts.replyTo]);
  const now = Math.floor(Date.now() / 1000);

  if (opts.channel === 'nip04') {
    const event = signEvent(
      { kind: KIND_NIP04_DM, created_at: now, tags, content: nip04.encrypt(opts.sk, recipient, opts.content) },
      opts.sk,
    );
    return { event, requestId: event.id };
  }

  const rumorBody = { pubkey: fastPublicKey(opts.sk), created_at: now, kind: KIND_PRIVATE_DM, tags, content: opts.content };
  const rumor = { ...rumorBody, id: fastEventHash(rumorBody) };
  const seal = signEvent(
    {
      kind: KIND_SEAL,
      created_at: randomPast(now),
      tags: [],
      content: fastNip44Encrypt(JSON.stringify(rumor), conversationKey(opts.sk, recipient)),
    },
    opts.sk,
  );
  // A fresh key per wrap: relays see neither the sender nor a link between wraps.
  const ephemeral = generateSecretKey();
  const event = signEvent(
    {
      kind: KIND_GIFT_WRAP,
      created_at: randomPast(now),
      tags: [['p', recipient]],
      content: fastNip44Encrypt(JSON.stringify(seal), conversationKey(ephemeral, recipient)),
    },
    ephemeral,
  );
  return { event, requestId: rumor.id };
}

/**
 * The event to publish: a gift wrap for the recipient (NIP-17: rumor kind 14
 * with `["p", recipient]` and `["e", replyTo]`) or a signed kind 4 (NIP-04).
 */
export function sealDm(opts: SealDmOptions): NostrEvent {
  return sealDmRequest(opts).event;
}
