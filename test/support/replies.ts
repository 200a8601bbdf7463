/**
 * Requests as a consumer would seal them, and the agent's replies read back
 * from what it published, for tests that drive the agent through a scripted
 * relay (hostile-relay.ts) instead of a ConsumerClient.
 */
import { generateSecretKey, getPublicKey } from 'nostr-tools/pure';
import { openDm, sealDmRequest } from '../../src/nostr/dm.js';
import type { NostrEvent } from '../../src/nostr/types.js';

export interface Key {
  sk: Uint8Array;
  pubkey: string;
}

export function freshKey(): Key {
  const sk = generateSecretKey();
  return { sk, pubkey: getPublicKey(sk) };
}

export interface SentRequest {
  event: NostrEvent;
  requestId: string;
  from: Key;
}

export function sealRequest(from: Key, provider: string, body: Record<string, unknown>, channel: 'nip17' | 'nip04' = 'nip17'): SentRequest {
  const { event, requestId } = sealDmRequest({ sk: from.sk, recipient: provider, content: JSON.stringify(body), channel });
  return { event, requestId, from };
}

export interface Answer {
  /** Position of the carrying event in `published`. */
  index: number;
  to: string;
  body: Record<string, unknown>;
}

/** Opened events by event id (tests poll often; each event is decrypted once). */
const openedCache = new Map<string, { to: string; body: Record<string, unknown> } | null>();

/** Every published DM one of `keys` can open, by the request it names (`request_id`). */
export function answersByRequest(published: readonly NostrEvent[], keys: readonly Key[]): Map<string, Answer[]> {
  const byPub = new Map(keys.map((k) => [k.pubkey, k]));
  const out = new Map<string, Answer[]>();
  // The same event sent again (e.g. to a relay that had not acknowledged it before a reconnect) is one message.
  const seenIds = new Set<string>();
  published.forEach((ev, index) => {
    if (seenIds.has(ev.id)) return;
    seenIds.add(ev.id);
    let opened = openedCache.get(ev.id);
    if (opened === undefined) {
      const to = ev.tags.find((t) => t[0] === 'p')?.[1];
      const key = to ? byPub.get(to) : undefined;
      if (!key) return; // perhaps for a key added later: not cached
      const dm = openDm(ev, key.sk, key.pubkey);
      opened = dm.ok ? { to: key.pubkey, body: JSON.parse(dm.dm.content) as Record<string, unknown> } : null;
      openedCache.set(ev.id, opened);
    }
    if (!opened) return;
    const id = typeof opened.body.request_id === 'string' ? opened.body.request_id : '';
    const list = out.get(id) ?? [];
    list.push({ index, ...opened });
    out.set(id, list);
  });
  return out;
}

/** The raw JSON text of `["EVENT", subId, event]` with `extra` (raw JSON text) added to the event as an unsigned field. */
export function eventFrameWithExtra(subId: string, ev: NostrEvent, extra: string): string {
  const json = JSON.stringify(ev);
  return `["EVENT",${JSON.stringify(subId)},${json.slice(0, -1)},"extra":${extra}}]`;
}

export function deepArray(depth: number): string {
  return '['.repeat(depth) + ']'.repeat(depth);
}
