/**
 * The one place that decides what a signed Nostr event looks like when it
 * comes from outside (a relay frame, a decrypted seal). Pure.
 *
 * `parseSignedEvent` returns a fresh object holding the seven signed fields
 * only, each shape-checked and bounded. Nothing else a relay attached to the
 * event survives: only signed fields are hashed, so a relay (or anyone
 * between) may add any unsigned field — e.g. a 20 000-deep array — to an event
 * whose signature still verifies, and such a field must never reach a queue,
 * a worker's structured clone or a log.
 */
import { HEX128, HEX64 } from '../util/hex.js';
import type { NostrEvent } from './types.js';

/**
 * Bounds on what one event may carry. A NIP-44 plaintext is at most 64 KiB;
 * wrapped twice in base64 and JSON it stays well under the content bound.
 * DMs carry one or two tags and discovery offers a handful: the tag bounds
 * leave room for any event this project reads.
 */
export const EVENT_LIMITS = {
  contentChars: 256 * 1024,
  tags: 256,
  valuesPerTag: 16,
  tagValueChars: 4096,
} as const;

export function isTimestamp(x: unknown): x is number {
  return typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;
}

/** A bounded array of bounded string arrays (the `tags` of an event or rumor). */
export function isTags(x: unknown): x is string[][] {
  if (!Array.isArray(x) || x.length > EVENT_LIMITS.tags) return false;
  for (const t of x) {
    if (!Array.isArray(t) || t.length > EVENT_LIMITS.valuesPerTag) return false;
    for (const v of t) if (typeof v !== 'string' || v.length > EVENT_LIMITS.tagValueChars) return false;
  }
  return true;
}

/**
 * A fresh plain copy of a signed event from its signed fields, or null when
 * any of them is missing, of the wrong shape or over a bound. The copy also
 * means what is verified and decrypted later is a snapshot the caller's object
 * cannot alter midway.
 */
export function parseSignedEvent(x: unknown): NostrEvent | null {
  if (typeof x !== 'object' || x === null || Array.isArray(x)) return null;
  const e = x as Record<string, unknown>;
  if (typeof e.id !== 'string' || !HEX64.test(e.id)) return null;
  if (typeof e.pubkey !== 'string' || !HEX64.test(e.pubkey)) return null;
  if (typeof e.sig !== 'string' || !HEX128.test(e.sig)) return null;
  if (typeof e.kind !== 'number' || !Number.isSafeInteger(e.kind) || e.kind < 0) return null;
  if (!isTimestamp(e.created_at)) return null;
  if (typeof e.content !== 'string' || e.content.length > EVENT_LIMITS.contentChars) return null;
  if (!isTags(e.tags)) return null;
  return {
    id: e.id,
    pubkey: e.pubkey,
    sig: e.sig,
    kind: e.kind,
    created_at: e.created_at,
    content: e.content,
    tags: e.tags.map((t) => [...t]),
  };
}
