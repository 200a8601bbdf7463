/**
 * Shapes shared by the Nostr layer. Nothing here knows about VMs or the request protocol.
 */
import type { Event as NostrEvent } from 'nostr-tools';

export type { NostrEvent };

/** How a direct message travelled; replies go back on the same channel. */
export type DmChannel = 'nip17' | 'nip04';

/** A decrypted, authenticated direct message addressed to us. */
export interface IncomingDm {
  /** Id of the outer event as seen on relays (the gift wrap for NIP-17, the kind-4 event for NIP-04). Used for dedupe. */
  eventId: string;
  /** Id that names the request in the reply: the rumor id for NIP-17, the event id for NIP-04. */
  requestId: string;
  /** Hex pubkey of the authenticated sender (rumor.pubkey == seal.pubkey for NIP-17). */
  sender: string;
  /** Decrypted plaintext. May contain secrets: never log it. */
  content: string;
  channel: DmChannel;
  /** Sender-asserted creation time (the rumor's for NIP-17), unix seconds. */
  createdAt: number;
}
