/**
 * The one spelling of a Nostr key, event id or request id (32 bytes) and of a
 * signature (64 bytes): lowercase hex, as every event on the wire carries them.
 * Input meant for people (a key pasted into config) may be uppercase: lower it
 * before testing.
 */
export const HEX64 = /^[0-9a-f]{64}$/;
export const HEX128 = /^[0-9a-f]{128}$/;
