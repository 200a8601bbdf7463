import { describe, expect, it } from 'vitest';
import {
  CPU_OVERCOMMIT,
  SenderRateLimiter,
  SpawnAdmission,
  checkDisk,
  checkSpawn,
  refillBucket,
  resolveHostCapacity,
  type Holding,
  type SpawnLimits,
  type Usage,
} from '../../src/agent/admission.js';
import { RequestError } from '../../src/protocol/errors.js';
import { ConfigSchema } from '../../src/config/schema.js';

function clock(start = 1_000_000) {
  let t = start;
  return { now: () => t, advance: (ms: number) => void (t += ms) };
}

describe('token bucket', () => {
  it('refill is linear, capped at capacity, and ignores a clock that steps back', () => {
    const b = { tokens: 0, at: 0, noticedAt: -Infinity };
    expect(refillBucket(b, 500, 10, 2).tokens).toBe(1);
    expect(refillBucket(b, 60_000, 10, 2).tokens).toBe(10);
    const back = refillBucket({ tokens: 3, at: 1000, noticedAt: -Infinity }, 0, 10, 2);
    expect(back).toMatchObject({ tokens: 3, at: 1000 });
  });

  it('allows a burst, then refuses; one token per refill interval after that', () => {
    const c = clock();
    const rl = new SenderRateLimiter({ capacity: 3, refillPerSecond: 0.5, now: c.now });
    expect([rl.take('a'), rl.take('a'), rl.take('a')]).toEqual(['allow', 'allow', 'allow']);
    expect(rl.take('a')).toBe('limited');
    // Told once; the rest of the flood is dropped without a reply.
    expect(rl.take('a')).toBe('drop');
    expect(rl.take('a')).toBe('drop');
    // Another key is not affected.
    expect(rl.take('b')).toBe('allow');
    c.advance(1999);
    expect(rl.take('a')).toBe('drop');
    c.advance(1);
    expect(rl.take('a')).toBe('allow');
    expect(rl.take('a')).toBe('limited');
  });

  it('refused requests do not consume tokens', () => {
    const c = clock();
    const rl = new SenderRateLimiter({ capacity: 1, refillPerSecond: 1, now: c.now });
    expect(rl.take('a')).toBe('allow');
    for (let i = 0; i < 50; i++) rl.take('a');
    c.advance(1000);
    expect(rl.take('a')).toBe('allow');
  });

  it('tracks a bounded number of senders, forgetting the least recently seen', () => {
    const c = clock();
    const rl = new SenderRateLimiter({ capacity: 1, refillPerSecond: 1 / 60, maxSenders: 100, now: c.now });
    expect(rl.take('victim')).toBe('allow');
    expect(rl.take('victim')).toBe('limited');
    for (let i = 0; i < 10_000; i++) rl.take(`fresh-${i}`);
    expect(rl.size).toBe(100);
    // Forgotten: it comes back as a new key would, with a full bucket — no more than any fresh key gets.
    expect(rl.take('victim')).toBe('allow');
    expect(rl.take('victim')).toBe('limited');
  });

  it('a sender seen recently survives a flood smaller than the bound', () => {
    const c = clock();
    const rl = new SenderRateLimiter({ capacity: 1, refillPerSecond: 1 / 60, maxSenders: 100, now: c.now });
    rl.take('busy');
    for (let i = 0; i < 98; i++) rl.take(`fresh-${i}`);
    expect(rl.take('busy')).toBe('limited');
  });
});

const LIMITS: SpawnLimits = { maxVmsPerSender: 2, maxVms: 3, maxSpawnsInFlight: 2, hostCapacity: { vcpus: 4, memoryMb: 1000 } };
const idle: Usage = { senderVms: 0, vms: 0, inFlight: 0, vcpus: 0, memoryMb: 0 };
const code = (e: RequestError | null) => e?.code ?? null;

describe('checkSpawn', () => {
  const want = { vcpus: 1, memoryMb: 256 };
  it('admits within every limit', () => {
    expect(checkSpawn(idle, want, LIMITS)).toBeNull();
    expect(checkSpawn({ senderVms: 1, vms: 2, inFlight: 1, vcpus: 3, memoryMb: 744 }, want, LIMITS)).toBeNull();
  });
  it('answers each limit with its own code', () => {
    expect(code(checkSpawn({ ...idle, senderVms: 2, vms: 2 }, want, LIMITS))).toBe('quota_exceeded');
    expect(code(checkSpawn({ ...idle, vms: 3 }, want, LIMITS))).toBe('capacity_exhausted');
    expect(code(checkSpawn({ ...idle, vcpus: 4 }, want, LIMITS))).toBe('capacity_exhausted');
    expect(code(checkSpawn({ ...idle, memoryMb: 745 }, want, LIMITS))).toBe('capacity_exhausted');
    expect(code(checkSpawn(idle, { vcpus: 5, memoryMb: 1 }, LIMITS))).toBe('capacity_exhausted');
    expect(code(checkSpawn({ ...idle, inFlight: 2 }, want, LIMITS))).toBe('busy');
  });
  it("the sender's own quota is reported before the host's state", () => {
    expect(code(checkSpawn({ senderVms: 2, vms: 3, inFlight: 2, vcpus: 4, memoryMb: 1000 }, want, LIMITS))).toBe('quota_exceeded');
  });
  it('messages say which resource ran out, not who holds it', () => {
    expect(checkSpawn({ ...idle, memoryMb: 900 }, want, LIMITS)?.message).toMatch(/memory/);
    expect(checkSpawn({ ...idle, vcpus: 4 }, want, LIMITS)?.message).toMatch(/vCPU/);
  });
});

describe('SpawnAdmission', () => {
  it('reserves at admission, so concurrent spawns cannot share the last slot, and release gives it back', () => {
    const live: Holding[] = [{ owner: 'x', vcpus: 1, memoryMb: 256 }];
    const adm = new SpawnAdmission({ ...LIMITS, maxSpawnsInFlight: 10 }, () => live);
    const r1 = adm.reserve('a', { vcpus: 1, memoryMb: 256 });
    const r2 = adm.reserve('b', { vcpus: 1, memoryMb: 256 });
    // live 1 + reserved 2 = maxVms 3
    expect(() => adm.reserve('c', { vcpus: 1, memoryMb: 100 })).toThrowError(expect.objectContaining({ code: 'capacity_exhausted' }));
    expect(adm.inFlight).toBe(2);
    r1.release();
    r1.release(); // idempotent: must not free r2's share
    expect(adm.inFlight).toBe(1);
    const r3 = adm.reserve('c', { vcpus: 1, memoryMb: 100 });
    r2.release();
    r3.release();
    expect(adm.usage('a')).toEqual({ senderVms: 0, vms: 1, inFlight: 0, vcpus: 1, memoryMb: 256, diskGb: 0 });
  });

  it("counts a sender's spawns in flight against its quota", () => {
    const adm = new SpawnAdmission(LIMITS, () => [{ owner: 'a', vcpus: 1, memoryMb: 1 }]);
    adm.reserve('a', { vcpus: 1, memoryMb: 1 });
    expect(() => adm.reserve('a', { vcpus: 1, memoryMb: 1 })).toThrowError(expect.objectContaining({ code: 'quota_exceeded' }));
  });

  it('counts committed resources of live workloads', () => {
    const live: Holding[] = [{ owner: 'x', vcpus: 3, memoryMb: 900 }];
    const adm = new SpawnAdmission(LIMITS, () => live);
    expect(() => adm.reserve('a', { vcpus: 1, memoryMb: 101 })).toThrowError(expect.objectContaining({ code: 'capacity_exhausted' }));
    live.pop();
    expect(() => adm.reserve('a', { vcpus: 1, memoryMb: 101 })).not.toThrow();
  });

  it('busy when spawns in flight reach the bound', () => {
    const adm = new SpawnAdmission({ ...LIMITS, maxVms: 10, maxSpawnsInFlight: 1 }, () => []);
    adm.reserve('a', { vcpus: 1, memoryMb: 1 });
    expect(() => adm.reserve('b', { vcpus: 1, memoryMb: 1 })).toThrowError(expect.objectContaining({ code: 'busy' }));
  });
});

describe('disk admission', () => {
  const GB = 1024 ** 3;
  it('admits when what live workloads may still grow, the new diskGb and the reserve fit in the free space', () => {
    // 10 GB free, 2 GB reserve: 8 GB to promise. Live: 5 GB promised, 1 GB already written → 4 GB may still come.
    const reading = { freeBytes: 10 * GB, allocatedBytes: 1 * GB };
    expect(checkDisk(5, 4, reading, 2)).toBeNull();
    const refusal = checkDisk(5, 5, reading, 2);
    expect(refusal).toBeInstanceOf(RequestError);
    expect(refusal?.code).toBe('capacity_exhausted');
    expect(refusal?.message).toContain('5 GB more disk');
    // An overlay larger than its promise (qcow2 metadata) never counts as negative growth.
    expect(checkDisk(1, 8, { freeBytes: 10 * GB, allocatedBytes: 3 * GB }, 2)).toBeNull();
    expect(checkDisk(0, 1, { freeBytes: 2.5 * GB, allocatedBytes: 0 }, 2)).toMatchObject({ code: 'capacity_exhausted' });
  });

  it('SpawnAdmission reserves diskGb for spawns in flight and counts live leases, reading the disk at each admission', () => {
    const live: Holding[] = [{ workloadId: 'w-1', owner: 'x', vcpus: 1, memoryMb: 100, diskGb: 3 }];
    let free = 10 * GB;
    const reads: string[][] = [];
    const a = new SpawnAdmission({ ...LIMITS, maxVms: 10, maxVmsPerSender: 10 }, () => live, {
      reserveGb: 2,
      read: (l) => {
        reads.push(l.map((h) => h.workloadId ?? '?'));
        return { freeBytes: free, allocatedBytes: 0 };
      },
    });
    // 10 free - 2 reserve - 3 (live may grow) = 5 GB to promise.
    const r1 = a.reserve('a', { vcpus: 1, memoryMb: 100, diskGb: 3 });
    expect(() => a.reserve('b', { vcpus: 1, memoryMb: 100, diskGb: 3 })).toThrow(/3 GB more disk/);
    expect(a.reserve('b', { vcpus: 1, memoryMb: 100, diskGb: 2 })).toBeDefined();
    r1.release();
    free = 4 * GB; // something else filled the disk
    expect(() => a.reserve('c', { vcpus: 1, memoryMb: 100, diskGb: 1 })).toThrow(RequestError);
    expect(reads[0]).toEqual(['w-1']);
  });

  it('a disk that cannot be read admits nothing', () => {
    const a = new SpawnAdmission(LIMITS, () => [], {
      reserveGb: 0,
      read: () => {
        throw Object.assign(new Error('EIO'), { code: 'EIO' });
      },
    });
    expect(() => a.reserve('a', { vcpus: 1, memoryMb: 1, diskGb: 1 })).toThrow(expect.objectContaining({ code: 'capacity_exhausted' }));
  });
});

describe('host capacity', () => {
  it('derives cores x overcommit vCPUs and RAM minus max(1 GiB, 10 %)', () => {
    expect(resolveHostCapacity(undefined, { cpus: 2, totalMemoryMb: 24_000 })).toEqual({ vcpus: 2 * CPU_OVERCOMMIT, memoryMb: 21_600 });
    expect(resolveHostCapacity(undefined, { cpus: 1, totalMemoryMb: 4000 })).toEqual({ vcpus: CPU_OVERCOMMIT, memoryMb: 2976 });
    expect(resolveHostCapacity({ memoryMb: 512 }, { cpus: 8, totalMemoryMb: 4000 })).toEqual({ vcpus: 32, memoryMb: 512 });
  });
});

describe('config', () => {
  const base = {
    provider: { keyFile: '/k', publicHost: 'h' },
    relays: ['ws://127.0.0.1:1'],
    tiers: [{ level: 'dedicated-host', driver: 'kvm' }],
    plans: [{ id: 'p', name: 'P', vcpus: 1, memoryMb: 256, diskGb: 1 }],
    defaultPlan: 'p',
    drivers: { kvm: { baseImage: '/b' } },
  };
  it('a config without the new limit fields stays valid and gets defaults', () => {
    const cfg = ConfigSchema.parse({ ...base, limits: { maxContentBytes: 4096 } });
    expect(cfg.limits).toMatchObject({ maxContentBytes: 4096, ratePerMinute: 30, rateBurst: 10, maxVmsPerSender: 3, maxVms: 32, maxSpawnsInFlight: 4 });
    expect(ConfigSchema.parse(base).limits.rateBurst).toBe(10);
    expect(ConfigSchema.parse(base).limits.diskReserveGb).toBe(2);
  });
  it('rejects nonsense limits naming the field', () => {
    const r = ConfigSchema.safeParse({ ...base, limits: { rateBurst: 0 } });
    expect(r.success).toBe(false);
    expect(JSON.stringify(r.error?.issues[0]?.path)).toContain('rateBurst');
  });
});
