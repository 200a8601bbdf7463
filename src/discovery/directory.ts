/**
 * The consumer's view of discovery: offers and heartbeats from relays folded
 * into one entry per provider. The event's signed author is the provider's
 * identity; a `provider_npub` in the content that disagrees is ignored, so an
 * offer cannot speak for another key.
 */
import { npubEncode } from 'nostr-tools/nip19';
import { RelayPool } from '../nostr/relays.js';
import type { NostrEvent } from '../nostr/types.js';
import { silentLogger } from '../util/logger.js';
import { KIND_HEARTBEAT, KIND_HEARTBEAT_EPHEMERAL, KIND_OFFER, type Capacity, type OfferContent } from './events.js';

/** A provider counts as online with a heartbeat this recent. */
export const ONLINE_WINDOW_SECONDS = 180;

export interface ProviderEntry {
  pubkey: string;
  npub: string;
  name: string | null;
  location: string | null;
  isolation_level: string | null;
  capabilities: string[];
  specs: OfferContent['specs'];
  api_endpoint: string | null;
  online: boolean;
  /** Unix seconds of the newest heartbeat, null if none was seen. */
  last_seen: number | null;
  active_workloads: number | null;
  available_capacity: Capacity | null;
}

function parseObject(text: string): Record<string, unknown> | null {
  try {
    const v: unknown = JSON.parse(text);
    return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : null;
  } catch {
    return null;
  }
}

const str = (v: unknown): string | null => (typeof v === 'string' ? v : null);
const num = (v: unknown): number | null => (typeof v === 'number' && Number.isFinite(v) ? v : null);

function isOffer(ev: NostrEvent): boolean {
  return ev.kind === KIND_OFFER && ev.tags.some((t) => t[0] === 'd' && typeof t[1] === 'string' && t[1].startsWith('paygress:offer:'));
}

/** Pure: events (any order, duplicates allowed) → providers, online ones first, then by name. */
export function buildDirectory(events: readonly NostrEvent[], now: number, onlineWindow = ONLINE_WINDOW_SECONDS): ProviderEntry[] {
  const offers = new Map<string, { at: number; content: Record<string, unknown> }>();
  const beats = new Map<string, { at: number; content: Record<string, unknown> }>();
  for (const ev of events) {
    const content = parseObject(ev.content);
    if (!content) continue;
    const into = isOffer(ev) ? offers : ev.kind === KIND_HEARTBEAT || ev.kind === KIND_HEARTBEAT_EPHEMERAL ? beats : undefined;
    if (!into) continue;
    const cur = into.get(ev.pubkey);
    if (!cur || ev.created_at > cur.at) into.set(ev.pubkey, { at: ev.created_at, content });
  }
  const out: ProviderEntry[] = [];
  for (const pubkey of new Set([...offers.keys(), ...beats.keys()])) {
    const offer = offers.get(pubkey)?.content ?? {};
    const beat = beats.get(pubkey);
    const cap = beat?.content.available_capacity as Record<string, unknown> | undefined;
    const capacity =
      cap && typeof cap === 'object'
        ? { cpu_available: num(cap.cpu_available) ?? 0, memory_mb_available: num(cap.memory_mb_available) ?? 0, storage_gb_available: num(cap.storage_gb_available) ?? 0 }
        : null;
    out.push({
      pubkey,
      npub: npubEncode(pubkey),
      name: str(offer.hostname),
      location: str(offer.location),
      isolation_level: str(offer.isolation_level),
      capabilities: Array.isArray(offer.capabilities) ? offer.capabilities.filter((c): c is string => typeof c === 'string') : [],
      specs: Array.isArray(offer.specs) ? (offer.specs as OfferContent['specs']).filter((s) => typeof s === 'object' && s !== null) : [],
      api_endpoint: str(offer.api_endpoint),
      online: beat !== undefined && now - beat.at <= onlineWindow,
      last_seen: beat?.at ?? null,
      active_workloads: beat ? num(beat.content.active_workloads) : null,
      available_capacity: capacity,
    });
  }
  return out.sort((a, b) => Number(b.online) - Number(a.online) || (a.name ?? a.npub).localeCompare(b.name ?? b.npub));
}

/**
 * Read offers and recent heartbeats from the relays until each connected relay
 * has sent EOSE (or the timeout passes), then fold them.
 */
export async function fetchDirectory(relays: string[], opts: { timeoutMs?: number } = {}): Promise<ProviderEntry[]> {
  const timeoutMs = opts.timeoutMs ?? 8_000;
  const pool = new RelayPool({ urls: relays, logger: silentLogger });
  const events: NostrEvent[] = [];
  try {
    pool.start();
    await pool.waitConnected(timeoutMs);
    const now = Math.floor(Date.now() / 1000);
    await new Promise<void>((resolve) => {
      const eosed = new Set<string>();
      const timer = setTimeout(resolve, timeoutMs);
      pool.subscribe(
        [
          { kinds: [KIND_OFFER], '#t': ['paygress'] },
          // Heartbeats are filtered by time, not tag: upstream's carry only the `d` tag.
          { kinds: [KIND_HEARTBEAT, KIND_HEARTBEAT_EPHEMERAL], since: now - 3600, limit: 2000 },
        ],
        (ev) => events.push(ev),
        {
          onEose: (url) => {
            eosed.add(url);
            if (eosed.size >= pool.connectedCount()) {
              clearTimeout(timer);
              resolve();
            }
          },
        },
      );
    });
  } finally {
    await pool.close();
  }
  return buildDirectory(events, Math.floor(Date.now() / 1000));
}
