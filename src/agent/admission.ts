/**
 * Admission: what a request must get past before it may cost anything.
 *
 * - `SenderRateLimiter`: a token bucket per sender key, checked for every
 *   request type right after decryption and before JSON parsing. The map of
 *   buckets is bounded (least recently used sender evicted first), so a flood
 *   of fresh keys cannot grow memory without bound.
 * - `SpawnAdmission`: per-sender and global caps on live workloads, a bound on
 *   spawns in flight, committed vCPU/RAM against the host's capacity, and
 *   disk: every overlay may grow to its plan's `diskGb`, so what live
 *   workloads may still write plus the new one's `diskGb` must fit in the free
 *   space under the VM root minus a reserve kept for the host and the agent.
 *   A spawn reserves its share before the driver is called and releases it
 *   when it fails or once its lease exists (then the lease counts), so two
 *   concurrent spawns cannot both squeeze into the last slot.
 *
 * The decisions themselves (`refillBucket`, `checkSpawn`) are pure functions;
 * the classes only hold state and a clock; the free-space reading is passed in.
 */
import { cpus, totalmem } from 'node:os';
import { RequestError } from '../protocol/errors.js';

// --- rate limit ------------------------------------------------------------------

export interface Bucket {
  tokens: number;
  /** Clock time (ms) `tokens` was computed at. */
  at: number;
  /** Last time this sender was told `rate_limited` (ms), or -Infinity. */
  noticedAt: number;
}

export interface RateLimitOptions {
  /** Burst: requests a quiet sender may send at once. */
  capacity: number;
  /** Tokens added per second, up to `capacity`. */
  refillPerSecond: number;
  /** Most senders tracked at once; beyond it the least recently seen is forgotten. */
  maxSenders?: number;
  /** Milliseconds clock; injectable for tests. */
  now?: () => number;
}

/**
 * `allow`: go on. `limited`: refuse and say `rate_limited`. `drop`: refuse
 * silently — the sender was told moments ago, and answering every message of
 * a flood would make the agent an amplifier (each reply is a signed, encrypted
 * event on the relays).
 */
export type RateDecision = 'allow' | 'limited' | 'drop';

/** Bucket after `now - at` ms of refill. Pure. */
export function refillBucket(b: Bucket, now: number, capacity: number, refillPerSecond: number): Bucket {
  // A clock that steps back must not mint tokens or go negative.
  const elapsed = Math.max(0, now - b.at);
  return { ...b, tokens: Math.min(capacity, b.tokens + (elapsed / 1000) * refillPerSecond), at: Math.max(b.at, now) };
}

export const DEFAULT_MAX_TRACKED_SENDERS = 10_000;

export class SenderRateLimiter {
  /** Map order is recency order: the first key is the least recently seen sender. */
  private readonly buckets = new Map<string, Bucket>();
  private readonly now: () => number;
  private readonly maxSenders: number;
  /** At most one `rate_limited` reply per sender per this many ms (the time one token takes). */
  private noticeIntervalMs: number;

  constructor(private readonly opts: RateLimitOptions) {
    if (!(opts.capacity >= 1) || !(opts.refillPerSecond > 0)) throw new Error('rate limit needs capacity >= 1 and refill > 0');
    this.now = opts.now ?? Date.now;
    this.maxSenders = opts.maxSenders ?? DEFAULT_MAX_TRACKED_SENDERS;
    this.noticeIntervalMs = 1000 / opts.refillPerSecond;
  }

  take(sender: string): RateDecision {
    const now = this.now();
    const old = this.buckets.get(sender);
    // A forgotten sender comes back with a full bucket: eviction can only ever
    // give a key what a brand-new key gets anyway, so it opens no bypass that
    // generating keys does not already open.
    let b = old
      ? refillBucket(old, now, this.opts.capacity, this.opts.refillPerSecond)
      : { tokens: this.opts.capacity, at: now, noticedAt: -Infinity };
    let decision: RateDecision;
    if (b.tokens >= 1) {
      b = { ...b, tokens: b.tokens - 1 };
      decision = 'allow';
    } else if (now - b.noticedAt >= this.noticeIntervalMs) {
      b = { ...b, noticedAt: now };
      decision = 'limited';
    } else {
      decision = 'drop';
    }
    this.buckets.delete(sender);
    this.buckets.set(sender, b);
    while (this.buckets.size > this.maxSenders) {
      const oldest = this.buckets.keys().next().value as string;
      this.buckets.delete(oldest);
    }
    return decision;
  }

  /** New burst and refill (config reload); buckets keep their tokens, capped at the new burst on the next take. */
  reconfigure(next: { capacity: number; refillPerSecond: number }): void {
    if (!(next.capacity >= 1) || !(next.refillPerSecond > 0)) throw new Error('rate limit needs capacity >= 1 and refill > 0');
    this.opts.capacity = next.capacity;
    this.opts.refillPerSecond = next.refillPerSecond;
    this.noticeIntervalMs = 1000 / next.refillPerSecond;
  }

  /** Senders currently tracked (bounded by `maxSenders`). */
  get size(): number {
    return this.buckets.size;
  }
}

/**
 * At most one notice per key per interval: the first refusal in an interval
 * is answered, the rest are dropped, so refusing a flood never makes the
 * agent send more than it receives. Bounded like the rate limiter's buckets.
 */
export class NoticeGate {
  /** Map order is recency order. */
  private readonly last = new Map<string, number>();
  private readonly now: () => number;

  constructor(
    private readonly intervalMs: number,
    private readonly maxKeys = DEFAULT_MAX_TRACKED_SENDERS,
    now?: () => number,
  ) {
    this.now = now ?? Date.now;
  }

  /** True when `key` may be told now (and records it). */
  take(key: string): boolean {
    const now = this.now();
    const at = this.last.get(key);
    if (at !== undefined && now - at < this.intervalMs && now >= at) return false;
    this.last.delete(key);
    this.last.set(key, now);
    while (this.last.size > this.maxKeys) this.last.delete(this.last.keys().next().value as string);
    return true;
  }
}

// --- spawn admission -------------------------------------------------------------

export interface HostCapacity {
  vcpus: number;
  memoryMb: number;
}

export interface SpawnLimits {
  maxVmsPerSender: number;
  maxVms: number;
  maxSpawnsInFlight: number;
  hostCapacity: HostCapacity;
}

/** vCPUs are time-shared: a host may promise more than it has cores. RAM is not overcommitted. */
export const CPU_OVERCOMMIT = 4;
/** RAM kept for the host itself (kernel, page cache, qemu's own overhead, the agent). */
export function memoryReserveMb(totalMb: number): number {
  return Math.max(1024, Math.round(totalMb * 0.1));
}

/**
 * Capacity when the config names none: cores × `CPU_OVERCOMMIT` vCPUs, and
 * total RAM minus `memoryReserveMb` (1 GiB or 10 %, whichever is more).
 * Explicit values win field by field.
 */
export function resolveHostCapacity(
  configured: Partial<HostCapacity> | undefined,
  host: { cpus: number; totalMemoryMb: number } = { cpus: cpus().length, totalMemoryMb: Math.floor(totalmem() / 1048576) },
): HostCapacity {
  return {
    vcpus: configured?.vcpus ?? Math.max(1, host.cpus) * CPU_OVERCOMMIT,
    memoryMb: configured?.memoryMb ?? Math.max(0, host.totalMemoryMb - memoryReserveMb(host.totalMemoryMb)),
  };
}

/** What is already promised: live workloads plus reservations of spawns in flight. */
export interface Usage {
  senderVms: number;
  vms: number;
  inFlight: number;
  vcpus: number;
  memoryMb: number;
  /** Disk promised to live workloads and spawns in flight (their plans' `diskGb`). */
  diskGb?: number;
}

export interface Want {
  vcpus: number;
  memoryMb: number;
  diskGb?: number;
}

/** What the disk under the VM root says now (read at the edge, e.g. statfs + the overlays' allocated blocks). */
export interface DiskReading {
  /** Bytes free for the agent's user. */
  freeBytes: number;
  /** Bytes the live workloads' overlays already take (part of what they were promised). */
  allocatedBytes: number;
}

export const GIB = 1024 ** 3;

/**
 * Room on disk for `wantGb` more, or the refusal. Pure. Live workloads may
 * still grow by what they were promised minus what they already took; that,
 * the new workload's size and the reserve must all fit in the free space.
 */
export function checkDisk(committedGb: number, wantGb: number, disk: DiskReading, reserveGb: number): RequestError | null {
  const stillToGrow = Math.max(0, committedGb * GIB - disk.allocatedBytes);
  if (stillToGrow + wantGb * GIB + reserveGb * GIB > disk.freeBytes) {
    return new RequestError('capacity_exhausted', `this host has no room for ${wantGb} GB more disk right now`);
  }
  return null;
}

/**
 * The verdict for one spawn, or null to admit it. Pure. Order: the sender's
 * own quota first (only they can fix it), then the host's room (nothing to
 * retry soon), then spawns in flight (transient: retry shortly).
 */
export function checkSpawn(usage: Usage, want: Want, limits: SpawnLimits, disk?: { reading: DiskReading; reserveGb: number }): RequestError | null {
  if (usage.senderVms >= limits.maxVmsPerSender) {
    return new RequestError('quota_exceeded', `this key may hold at most ${limits.maxVmsPerSender} live workload(s); stop one first`);
  }
  if (usage.vms >= limits.maxVms) {
    return new RequestError('capacity_exhausted', 'this host runs its maximum number of workloads');
  }
  if (usage.vcpus + want.vcpus > limits.hostCapacity.vcpus) {
    return new RequestError('capacity_exhausted', `this host has no room for ${want.vcpus} more vCPU(s) right now`);
  }
  if (usage.memoryMb + want.memoryMb > limits.hostCapacity.memoryMb) {
    return new RequestError('capacity_exhausted', `this host has no room for ${want.memoryMb} MB more memory right now`);
  }
  if (disk && want.diskGb !== undefined) {
    const refusal = checkDisk(usage.diskGb ?? 0, want.diskGb, disk.reading, disk.reserveGb);
    if (refusal) return refusal;
  }
  if (usage.inFlight >= limits.maxSpawnsInFlight) {
    return new RequestError('busy', 'too many workloads are starting right now; retry in a few seconds');
  }
  return null;
}

/** What a live workload holds; leases satisfy it. */
export interface Holding {
  /** Set for live workloads (leases), not for reservations in flight. */
  workloadId?: string;
  owner: string;
  vcpus: number;
  memoryMb: number;
  diskGb?: number;
  /** An idle VM of the agent's own (the warm pool) that `evictIdle` may give up for a spawn. */
  evictable?: boolean;
}

export interface DiskAdmission {
  /** Kept free under the VM root for the host, the agent's state and logs. */
  reserveGb: number;
  /** Read the disk now, given the live workloads (synchronous: admission decides in one turn). Throws if it cannot. */
  read(live: readonly Holding[]): DiskReading;
}

export interface Reservation {
  /** Give the share back. Idempotent. */
  release(): void;
}

export class SpawnAdmission {
  private readonly reserved = new Set<Holding>();

  /**
   * Frees the room of one idle VM of the agent's own (it leaves `live()` at
   * once); false when there is none. Asked when a paid (or free) spawn finds no room.
   */
  evictIdle: (() => boolean) | undefined;

  constructor(
    private limits: SpawnLimits,
    /** What live workloads hold: leases, and the warm pool's VMs (`evictable` when idle). */
    private readonly live: () => Iterable<Holding>,
    private readonly disk?: DiskAdmission,
  ) {}

  /** The verdict with `live` holding what it holds. Throws when the disk cannot be read at all. */
  private judge(sender: string, want: Want, live: Holding[]): RequestError | null {
    let disk: { reading: DiskReading; reserveGb: number } | undefined;
    if (this.disk && want.diskGb !== undefined) {
      try {
        disk = { reading: this.disk.read(live), reserveGb: this.disk.reserveGb };
      } catch {
        // The VM root cannot even be read: no promise can be kept on it.
        throw new RequestError('capacity_exhausted', 'this host cannot check its disk space right now');
      }
    }
    return checkSpawn(this.usage(sender, live), want, this.limits, disk);
  }

  /** New caps (config reload): the next spawn is judged by them; running workloads are left alone. */
  setLimits(limits: SpawnLimits): void {
    this.limits = limits;
  }

  usage(sender: string, live: Iterable<Holding> = this.live()): Usage {
    const u: Usage = { senderVms: 0, vms: 0, inFlight: this.reserved.size, vcpus: 0, memoryMb: 0, diskGb: 0 };
    for (const h of [...live, ...this.reserved]) {
      u.vms++;
      u.vcpus += h.vcpus;
      u.memoryMb += h.memoryMb;
      u.diskGb! += h.diskGb ?? 0;
      if (h.owner === sender) u.senderVms++;
    }
    return u;
  }

  /**
   * Admit a spawn and hold its share, or throw the `RequestError` to answer.
   * Synchronous on purpose: check and reserve happen in one turn of the event
   * loop, so no other spawn can slip in between. With `evict`, idle VMs of the
   * agent's own are given up first when that makes room; callers ask for it
   * only once the spawn is paid (or free), so a worthless token costs the
   * pool nothing.
   */
  reserve(sender: string, want: Want, opts: { evict?: boolean } = {}): Reservation {
    let refusal = this.judge(sender, want, [...this.live()]);
    if (opts.evict && this.evictionAdmits(sender, want, refusal)) {
      while (refusal && this.evictIdle!()) refusal = this.judge(sender, want, [...this.live()]);
    }
    if (refusal) throw refusal;
    const hold: Holding = { owner: sender, vcpus: want.vcpus, memoryMb: want.memoryMb, diskGb: want.diskGb };
    this.reserved.add(hold);
    return { release: () => void this.reserved.delete(hold) };
  }

  /**
   * Whether `refusal` (what `reserve` just threw) is only for room that VMs of
   * the agent's own (the warm pool) hold: giving them all up would admit the spawn.
   */
  admitsAfterEviction(sender: string, want: Want, refusal: unknown): boolean {
    return this.evictionAdmits(sender, want, refusal instanceof RequestError ? refusal : null);
  }

  private evictionAdmits(sender: string, want: Want, refusal: RequestError | null): boolean {
    return refusal?.code === 'capacity_exhausted' && !!this.evictIdle && !this.judge(sender, want, [...this.live()].filter((h) => !h.evictable));
  }

  /**
   * Whether the host's limits leave room for one more VM of the agent's own
   * (the warm pool): the same check as a spawn's, with no sender quota and
   * nothing reserved; the caller makes the VM count (in `live()`) in the same turn.
   */
  roomFor(want: Want): RequestError | null {
    let disk: { reading: DiskReading; reserveGb: number } | undefined;
    if (this.disk && want.diskGb !== undefined) {
      try {
        disk = { reading: this.disk.read([...this.live()]), reserveGb: this.disk.reserveGb };
      } catch {
        return new RequestError('capacity_exhausted', 'this host cannot check its disk space right now');
      }
    }
    return checkSpawn({ ...this.usage(''), senderVms: 0 }, want, this.limits, disk);
  }

  get inFlight(): number {
    return this.reserved.size;
  }
}
