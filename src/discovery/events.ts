/**
 * Discovery events in the upstream Paygress shapes (field names exact, see
 * docs/protocol.md "Discovery"). Pure: config facts and capacity numbers in,
 * unsigned event templates out. Signing and publishing live in publisher.ts.
 */
import type { IsolationLevel } from '../protocol/isolation.js';
import { isolationRank } from '../protocol/isolation.js';

export const KIND_OFFER = 38383;
export const KIND_HEARTBEAT = 38384;
export const KIND_HEARTBEAT_EPHEMERAL = 20384;
/** Upstream schema version carried in content and the `v` tag. */
export const DISCOVERY_VERSION = 1;

export interface OfferPlan {
  id: string;
  name: string;
  description: string;
  vcpus: number;
  memoryMb: number;
  rateMsatsPerSec: number;
}

export interface OfferFacts {
  /** Provider hex pubkey. Upstream puts the hex key in `provider_npub` and its clients compare hex. */
  pubkey: string;
  name: string;
  location: string;
  capabilities: readonly string[];
  plans: readonly OfferPlan[];
  /** Offered tiers; the offer advertises the most isolated one (a single slug upstream). */
  isolationLevels: readonly IsolationLevel[];
  apiEndpoint?: string | undefined;
  totalJobsCompleted: number;
  /** Mints whose tokens pay for leases (paid admission); none when nothing is charged. */
  whitelistedMints?: readonly string[];
}

export interface Capacity {
  /** Millicores. */
  cpu_available: number;
  memory_mb_available: number;
  storage_gb_available: number;
}

export interface EventTemplate {
  kind: number;
  created_at: number;
  tags: string[][];
  content: string;
}

export interface OfferContent {
  provider_npub: string;
  hostname: string;
  location: string | null;
  capabilities: string[];
  specs: Array<{ id: string; name: string; description: string; cpu_millicores: number; memory_mb: number; rate_msats_per_sec: number }>;
  whitelisted_mints: string[];
  uptime_percent: number;
  total_jobs_completed: number;
  api_endpoint: string | null;
  version: number;
  isolation_level: IsolationLevel;
}

export interface HeartbeatContent {
  provider_npub: string;
  timestamp: number;
  active_workloads: number;
  available_capacity: Capacity;
  version: number;
}

/** The most isolated of the offered tiers: a consumer asking for any minimum up to it can be served. */
export function strongestTier(levels: readonly IsolationLevel[]): IsolationLevel {
  return [...levels].sort((a, b) => isolationRank(b) - isolationRank(a))[0] ?? 'shared-kernel';
}

export function offerContent(f: OfferFacts): OfferContent {
  return {
    provider_npub: f.pubkey,
    hostname: f.name,
    location: f.location === '' ? null : f.location,
    capabilities: [...f.capabilities],
    specs: f.plans.map((p) => ({
      id: p.id,
      name: p.name,
      description: p.description,
      cpu_millicores: p.vcpus * 1000,
      memory_mb: p.memoryMb,
      rate_msats_per_sec: p.rateMsatsPerSec,
    })),
    whitelisted_mints: [...(f.whitelistedMints ?? [])],
    // Upstream also publishes a constant 100 and computes uptime client-side from heartbeats.
    uptime_percent: 100,
    total_jobs_completed: f.totalJobsCompleted,
    api_endpoint: f.apiEndpoint ?? null,
    version: DISCOVERY_VERSION,
    isolation_level: strongestTier(f.isolationLevels),
  };
}

export function offerEvent(f: OfferFacts, now: number): EventTemplate {
  return {
    kind: KIND_OFFER,
    created_at: now,
    tags: [
      ['d', `paygress:offer:v1:${f.pubkey}`],
      ['t', 'paygress'],
      ['t', 'compute'],
      ['v', String(DISCOVERY_VERSION)],
    ],
    content: JSON.stringify(offerContent(f)),
  };
}

export function heartbeatContent(pubkey: string, activeWorkloads: number, capacity: Capacity, now: number): HeartbeatContent {
  return { provider_npub: pubkey, timestamp: now, active_workloads: activeWorkloads, available_capacity: { ...capacity }, version: DISCOVERY_VERSION };
}

/**
 * The two heartbeats: 38384 is addressable per minute bucket (so relays keep
 * a history clients can compute uptime from), 20384 is ephemeral (live
 * subscribers only). Same content in both.
 */
export function heartbeatEvents(pubkey: string, activeWorkloads: number, capacity: Capacity, now: number): [EventTemplate, EventTemplate] {
  const content = JSON.stringify(heartbeatContent(pubkey, activeWorkloads, capacity, now));
  const tags = [['t', 'paygress'], ['v', String(DISCOVERY_VERSION)]];
  return [
    { kind: KIND_HEARTBEAT, created_at: now, tags: [['d', `paygress:heartbeat:v1:${pubkey}:${Math.floor(now / 60)}`], ...tags], content },
    { kind: KIND_HEARTBEAT_EPHEMERAL, created_at: now, tags: tags.map((t) => [...t]), content },
  ];
}
