import { describe, expect, it } from 'vitest';
import { finalizeEvent, generateSecretKey, getPublicKey } from 'nostr-tools';
import { freeCapacity } from '../../src/discovery/capacity.js';
import { buildDirectory } from '../../src/discovery/directory.js';
import { heartbeatEvents, offerEvent, strongestTier, type OfferFacts } from '../../src/discovery/events.js';

const sk = generateSecretKey();
const pk = getPublicKey(sk);
const facts: OfferFacts = {
  pubkey: pk, name: 'p', location: '', capabilities: ['vm'], isolationLevels: ['shared-kernel', 'dedicated-host'],
  plans: [{ id: 'a', name: 'A', description: '', vcpus: 2, memoryMb: 512, rateMsatsPerSec: 0 }], totalJobsCompleted: 0,
};

describe('discovery builders', () => {
  it('capacity is host minus held, floored at zero', () => {
    const host = { cpuCount: 2, memoryMb: 1000, diskFreeGb: 10 };
    expect(freeCapacity(host, [])).toEqual({ cpu_available: 2000, memory_mb_available: 1000, storage_gb_available: 10 });
    expect(freeCapacity(host, [{ vcpus: 1, memoryMb: 256, diskGb: 4 }])).toEqual({ cpu_available: 1000, memory_mb_available: 744, storage_gb_available: 6 });
    expect(freeCapacity(host, [{ vcpus: 3, memoryMb: 2000, diskGb: 40 }])).toEqual({ cpu_available: 0, memory_mb_available: 0, storage_gb_available: 0 });
  });

  it('capacity any spawn can have (an idle or booting pool VM, evictable) stays free', () => {
    const host = { cpuCount: 2, memoryMb: 1000, diskFreeGb: 10 };
    const held = [{ vcpus: 1, memoryMb: 256, diskGb: 4 }, { vcpus: 1, memoryMb: 512, diskGb: 2, evictable: true }];
    expect(freeCapacity(host, held)).toEqual({ cpu_available: 1000, memory_mb_available: 744, storage_gb_available: 6 });
  });

  it('offer: empty location is null, strongest tier advertised', () => {
    const ev = offerEvent(facts, 100);
    expect(JSON.parse(ev.content)).toMatchObject({ location: null, isolation_level: 'dedicated-host', api_endpoint: null });
    expect(strongestTier(['attested-research-tier', 'shared-kernel'])).toBe('attested-research-tier');
  });

  it('heartbeat d tag buckets by minute; both kinds share content', () => {
    const [stored, eph] = heartbeatEvents(pk, 0, { cpu_available: 1, memory_mb_available: 2, storage_gb_available: 3 }, 119);
    expect(stored.tags[0]).toEqual(['d', `paygress:heartbeat:v1:${pk}:1`]);
    expect(eph.kind).toBe(20384);
    expect(eph.content).toBe(stored.content);
    expect(heartbeatEvents(pk, 0, { cpu_available: 1, memory_mb_available: 2, storage_gb_available: 3 }, 120)[0].tags[0]![1]).toMatch(/:2$/);
  });
});

describe('directory', () => {
  const sign = (tpl: { kind: number; created_at: number; tags: string[][]; content: string }, key = sk) => finalizeEvent(tpl, key);
  const cap = { cpu_available: 1, memory_mb_available: 2, storage_gb_available: 3 };

  it('folds newest offer and heartbeat per author; online within the window', () => {
    const events = [sign(offerEvent({ ...facts, name: 'old' }, 10)), sign(offerEvent(facts, 20)), sign(heartbeatEvents(pk, 1, cap, 1000)[1])];
    const [p] = buildDirectory(events, 1000 + 180);
    expect(p).toMatchObject({ pubkey: pk, name: 'p', online: true, last_seen: 1000, active_workloads: 1, available_capacity: cap });
    expect(buildDirectory(events, 1000 + 181)[0]!.online).toBe(false);
  });

  it('an offer speaks for its signer only, whatever provider_npub claims; garbage is skipped', () => {
    const other = generateSecretKey();
    const spoof = sign(offerEvent({ ...facts, name: 'spoof' }, 30), other);
    const junk = sign({ kind: 38383, created_at: 40, tags: [['d', 'paygress:offer:v1:x']], content: 'not json' });
    const dir = buildDirectory([sign(offerEvent(facts, 20)), spoof, junk], 50);
    expect(dir.find((p) => p.pubkey === pk)!.name).toBe('p');
    expect(dir.find((p) => p.pubkey === getPublicKey(other))!.name).toBe('spoof');
    expect(dir.every((p) => !p.online)).toBe(true);
  });
});
