/**
 * `npm run bench`: what a provider's users feel, measured beside a baseline in
 * the same run on the same machine.
 *
 * Starts a local relay and the real agent CLI (TCG, the tiny guest), then:
 *   B1 spawn latency (DM sent → access-details reply), ≥ 20 sequential spawns,
 *      per-phase times from the agent's log, beside the bare floor (bench/floor.sh:
 *      the same overlay + seed + `qemu -daemonize` from a shell), interleaved
 *      one for one so both see the same machine load;
 *   B2 burst: 10 consumers spawn at once, against 10 × the B1 p50, and beside
 *      it ten floor.sh sequences at once (what the machine itself allows);
 *   B3 unwrap throughput: the agent's receive path (relay-pool signature check +
 *      openDm) against nostr-tools' nip17.unwrapEvent on the same 1000 wraps,
 *      and against @rust-nostr/nostr-sdk (a dev dependency) when installed;
 *   B4 agent RSS idle and with 5 live leases (/proc/<pid>/status);
 *   B5 stop: DM sent → qemu gone → reply received;
 *   B6 warm pool: DM sent → `ready` from the pool beside a cold boot of the same
 *      plan (the cloud guest, a second agent), and an idle pool VM's cost (warm.ts).
 * Prints a table (report.ts) and writes bench/results/<timestamp>.json
 * (results.ts). Phase times come from the agent's log through the documented
 * contract (phases.ts, docs/logs.md). Everything it starts (agent, relay,
 * every qemu, temp dirs) is removed at the end, also on failure or Ctrl-C.
 *
 * This file runs the measures in order; each measure lives in its own module:
 * spawn.ts (B1, B2, B5 samples), floor.ts (the shell baseline), unwrap.ts (B3),
 * machine.ts (B4 and the machine).
 *
 * The agent runs as production runs it: compiled by `npm run build` (tsc) and
 * started with plain `node dist/src/cli/agent.js`; under tsx the loader alone
 * adds ~40 MB of RSS that B4 would otherwise charge to the agent.
 *
 * Environment: BENCH_SPAWNS (default 20), BENCH_WRAPS (default 1000),
 * BENCH_WARM_SAMPLES (default 5; each takes a cold cloud boot), BENCH_ONLY=warm
 * (B6 alone), BENCH_SOURCE=1 (run the TypeScript source under tsx, skip the build).
 */
import { execa } from 'execa';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { generateSecretKey } from 'nostr-tools/pure';
import { ConsumerClient } from '../src/client/consumer.js';
import { findPids, processArgv, stopIdentified } from '../src/drivers/kvm/process.js';
// The bench runs the agent, relay and guest the integration tests run, from the same helpers.
import { startAgentProcess, type AgentProcess } from '../test/support/agent-process.js';
import { startRelay, type LocalRelay } from '../test/support/relay.js';
import { ensureTinyGuest, type TinyGuest } from '../test/support/tiny-guest.js';
import { ensureCloudGuest } from '../test/support/cloud-guest.js';
import { floorOnce, prepareFloor, writeFloorSeed, type FloorSample } from './floor.js';
import { machine, procStatusKb } from './machine.js';
import { spawnPhasesOf, type SpawnPhases } from './phases.js';
import { table, warmTable } from './report.js';
import { writeResults, type BenchResults, type BurstResults, type MemoryResults, type SpawnResults, type StopResults, type WarmResults } from './results.js';
import { spawnOnce, stopOnce, type SpawnSample, type StopSample } from './spawn.js';
import { p50, p95, r1, r2, spread } from './stats.js';
import { benchUnwrap } from './unwrap.js';
import { measureWarm, WARM_PLANS } from './warm.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const SPAWNS = Math.max(20, Number(process.env.BENCH_SPAWNS ?? 20));
const WRAPS = Math.max(100, Number(process.env.BENCH_WRAPS ?? 1000));
const BURST = 10;
const LIVE_LEASES = 5;
/** Ports well away from the tests' ranges; the floor has its own slice (floor.ts). */
const AGENT_PORTS = { from: 47100, to: 47179 };
const WARM_AGENT_PORTS = { from: 47180, to: 47199 };
const WARM_SAMPLES = Math.max(1, Number(process.env.BENCH_WARM_SAMPLES ?? 5));
const ONLY_WARM = process.env.BENCH_ONLY === 'warm';
const FROM_SOURCE = process.env.BENCH_SOURCE === '1';
/** Config `limits` for the bench's agent: the defaults (30/min, 4 spawns in flight, 8 vCPUs/core-pair) would refuse the load. */
const BENCH_LIMITS = {
  ratePerMinute: 100_000,
  rateBurst: 10_000,
  maxVmsPerSender: 100,
  maxVms: 100,
  maxConcurrentRequests: 16,
  maxSpawnsInFlight: 16,
  hostCapacity: { vcpus: 64, memoryMb: 16_384 },
};

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

// --- what the run starts, and taking it down again ------------------------------------

interface Ctx {
  root: string;
  guest: TinyGuest;
  relay: LocalRelay;
  agent: AgentProcess;
  agentPid: number;
  clients: ConsumerClient[];
  floorSeed: string;
}

const cleanups: (() => Promise<void> | void)[] = [];
let cleaning: Promise<void> | undefined;

function cleanupAll(): Promise<void> {
  cleaning ??= (async () => {
    for (const f of cleanups.reverse()) {
      try {
        await f();
      } catch (err) {
        console.error(`cleanup step failed: ${(err as Error).message}`);
      }
    }
  })();
  return cleaning;
}

/** Stop every process whose argv mentions `needle` (our temp root): qemus we or the agent started. One stuck pid does not stop the rest. */
async function stopAllMentioning(needle: string): Promise<void> {
  const mentions = async (pid: number) => (await processArgv(pid))?.some((a) => a.includes(needle)) ?? false;
  for (const pid of await findPids((argv) => argv.some((a) => a.includes(needle)))) {
    await stopIdentified(pid, () => mentions(pid), 5_000, `bench leftover ${pid}`).catch((err: Error) => console.error(`bench: ${err.message}`));
  }
}

async function setUp(): Promise<Ctx> {
  const root = mkdtempSync(path.join(os.tmpdir(), 'pga-bench-'));
  cleanups.push(() => rmSync(root, { recursive: true, force: true }));
  // Anything still running that mentions our root (agent-made or floor qemus) dies last-but-one.
  cleanups.push(async () => {
    await stopAllMentioning(root);
  });
  console.error(`bench: root ${root}; preparing guest, relay and agent...`);

  if (!FROM_SOURCE) {
    console.error('bench: npm run build (tsc)...');
    const build = await execa('npx', ['tsc', '-p', 'tsconfig.json'], { cwd: path.join(HERE, '..'), reject: false, all: true });
    if (build.exitCode !== 0) throw new Error(`npm run build failed (BENCH_SOURCE=1 runs the source instead):\n${String(build.all).slice(0, 4000)}`);
  }
  const guest = await ensureTinyGuest();
  const relay = await startRelay();
  cleanups.push(() => relay.stop());
  mkdirSync(path.join(root, 'agent'), { mode: 0o700 });
  const agent = await startAgentProcess({
    relays: [relay.url],
    guest,
    portRange: AGENT_PORTS,
    root: path.join(root, 'agent'),
    // Production log level: the bench should not pay for debug lines. Admission
    // limits are raised (BENCH_LIMITS) so that they do not answer the bench's
    // back-to-back requests and 10-wide burst with rate_limited/busy/capacity.
    overrides: { logLevel: 'info', limits: BENCH_LIMITS },
    compiled: !FROM_SOURCE,
  });
  cleanups.push(() => agent.stop());
  const agentPid = agent.proc.pid;
  if (agentPid === undefined) throw new Error('agent has no pid');

  const ctx: Ctx = { root, guest, relay, agent, agentPid, clients: [], floorSeed: writeFloorSeed(root) };
  cleanups.push(async () => {
    await Promise.allSettled(ctx.clients.map((c) => c.close()));
  });
  return ctx;
}

async function newClient(ctx: Ctx): Promise<ConsumerClient> {
  const c = new ConsumerClient({ sk: generateSecretKey(), provider: ctx.agent.pubkey, relays: [ctx.relay.url] });
  ctx.clients.push(c);
  await c.start();
  return c;
}

// --- the measures ---------------------------------------------------------------------

function rss(ctx: Ctx): { kb: number; split: { anon_mb: number; file_mb: number } } {
  // File-backed pages are mostly the node binary's own code, shared with every node process.
  return {
    kb: procStatusKb(ctx.agentPid, 'VmRSS'),
    split: { anon_mb: r1(procStatusKb(ctx.agentPid, 'RssAnon') / 1024), file_mb: r1(procStatusKb(ctx.agentPid, 'RssFile') / 1024) },
  };
}

/** B1 + B5: sequential spawn → stop, interleaved one for one with the floor so both see the same load. */
async function measureSequential(ctx: Ctx): Promise<{ spawn: SpawnResults; stop: StopResults; p50Ms: number }> {
  const client = await newClient(ctx);
  // One unmeasured round trip: connections, JIT and the accel probe are not what a user waits for each time.
  {
    const s = await spawnOnce(client);
    await stopOnce(client, s.workloadId);
  }
  const spawns: SpawnSample[] = [];
  const stops: StopSample[] = [];
  const floors: FloorSample[] = [];
  for (let i = 0; i < SPAWNS; i++) {
    floors.push(await floorOnce(ctx, i));
    const s = await spawnOnce(client);
    s.phases = spawnPhasesOf(ctx.agent.output(), s.workloadId);
    spawns.push(s);
    stops.push(await stopOnce(client, s.workloadId));
    console.error(`bench: B1 #${i + 1}: spawn ${r1(s.e2eMs)} ms (floor ${floors[i]!.total_ms} ms), stop reply ${r1(stops[i]!.replyMs)} ms`);
  }

  const e2e = spawns.map((s) => s.e2eMs);
  const floorTotal = floors.map((f) => f.total_ms);
  const phase = (k: keyof SpawnPhases) => spread(spawns.map((s) => s.phases[k]).filter((x): x is number => typeof x === 'number'));
  const dmPath = spawns.filter((s) => typeof s.phases.driverTotal === 'number').map((s) => s.e2eMs - s.phases.driverTotal!);
  const spawn: SpawnResults = {
    samples: spawns.length,
    p50_ms: r1(p50(e2e)),
    p95_ms: r1(p95(e2e)),
    floor_p50_ms: r1(p50(floorTotal)),
    floor_p95_ms: r1(p95(floorTotal)),
    ratio_p50: r2(p50(e2e) / p50(floorTotal)),
    phases_ms: {
      overlay: phase('overlay'),
      seed: phase('seed'),
      qemu: phase('qemu'),
      pidfile: phase('pidfile'),
      start: phase('start'),
      driver_total: phase('driverTotal'),
      dm_and_agent: spread(dmPath),
    },
    floor_phases_ms: {
      overlay: r1(p50(floors.map((f) => f.overlay_ms))),
      seed: r1(p50(floors.map((f) => f.seed_ms))),
      qemu: r1(p50(floors.map((f) => f.qemu_ms))),
    },
    e2e_samples_ms: e2e.map(r1),
    floor_samples_ms: floorTotal,
  };
  const stop: StopResults = {
    samples: stops.length,
    reply_p50_ms: r1(p50(stops.map((s) => s.replyMs))),
    reply_p95_ms: r1(p95(stops.map((s) => s.replyMs))),
    qemu_gone_p50_ms: r1(p50(stops.map((s) => s.goneMs))),
    qemu_gone_p95_ms: r1(p95(stops.map((s) => s.goneMs))),
  };
  return { spawn, stop, p50Ms: p50(e2e) };
}

/** B2: ten consumers at once, beside ten floor sequences at once; then B4 with live leases on the same clients. */
async function measureBurst(ctx: Ctx, singleP50Ms: number, floorP50Ms: number, rssIdle: ReturnType<typeof rss>): Promise<{ burst: BurstResults; memory: MemoryResults }> {
  const clients = await Promise.all(Array.from({ length: BURST }, () => newClient(ctx)));
  const b0 = performance.now();
  const burst = await Promise.all(
    clients.map(async (c) => {
      const s = await spawnOnce(c);
      return { ...s, doneAt: performance.now() - b0 };
    }),
  );
  const burstMs = performance.now() - b0;
  console.error(`bench: B2 burst of ${BURST}: ${r1(burstMs)} ms`);
  await Promise.all(burst.map((s, i) => stopOnce(clients[i]!, s.workloadId)));

  // B2's hardware floor: the same ten overlay + seed + qemu sequences from a shell, all at once.
  const taken = new Set<number>();
  const floorRuns = await Promise.all(Array.from({ length: BURST }, (_, i) => prepareFloor(ctx, 1000 + i, taken)));
  const fb0 = performance.now();
  const floorBurst = await Promise.allSettled(floorRuns.map((f) => f.run()));
  const floorBurstMs = performance.now() - fb0;
  await Promise.all(floorRuns.map((f) => f.cleanup()));
  for (const r of floorBurst) if (r.status === 'rejected') throw r.reason;
  console.error(`bench: B2 floor burst of ${BURST} shell sequences: ${r1(floorBurstMs)} ms`);

  // B4 (5 live leases).
  const live = await Promise.all(clients.slice(0, LIVE_LEASES).map((c) => spawnOnce(c)));
  await sleep(2_000);
  const rssLeases = rss(ctx);
  console.error(`bench: B4 RSS with ${LIVE_LEASES} leases ${r1(rssLeases.kb / 1024)} MB`);
  await Promise.all(live.map((s, i) => stopOnce(clients[i]!, s.workloadId)));
  const rssPeakKb = procStatusKb(ctx.agentPid, 'VmHWM');

  return {
    burst: {
      consumers: BURST,
      all_replied_ms: r1(burstMs),
      sequential_estimate_ms: r1(BURST * singleP50Ms),
      ratio: r2(burstMs / (BURST * singleP50Ms)),
      reply_times_ms: burst.map((b) => r1(b.doneAt)).sort((a, b) => a - b),
      floor_burst_ms: r1(floorBurstMs),
      floor_burst_ratio: r2(floorBurstMs / (BURST * floorP50Ms)),
      vs_floor_burst: r2(burstMs / floorBurstMs),
      floor_burst_note: 'the same ten overlay + seed + qemu -daemonize sequences run from a shell at once (no Nostr, no agent); what this machine allows',
    },
    memory: {
      idle_rss_mb: r1(rssIdle.kb / 1024),
      rss_with_leases_mb: r1(rssLeases.kb / 1024),
      leases: LIVE_LEASES,
      peak_rss_mb: r1(rssPeakKb / 1024),
      idle_split: rssIdle.split,
      leases_split: rssLeases.split,
      note: FROM_SOURCE
        ? 'agent child process (node --import tsx src/cli/agent.ts), /proc/<pid>/status'
        : 'agent child process (node dist/src/cli/agent.js, built by tsc), /proc/<pid>/status',
    },
  };
}

/** B6 on its own agent: the cloud guest, a pooled and a cold plan of the same size. */
async function measureWarmPool(ctx: Pick<Ctx, 'root' | 'relay' | 'clients'>): Promise<WarmResults> {
  const guest = await ensureCloudGuest();
  mkdirSync(path.join(ctx.root, 'warm-agent'), { mode: 0o700 });
  const agent = await startAgentProcess({
    relays: [ctx.relay.url],
    guest: { kernel: guest.kernel, initrd: guest.initrd, append: guest.append, baseImage: guest.baseImage, readiness: 'cloud-init' },
    portRange: WARM_AGENT_PORTS,
    root: path.join(ctx.root, 'warm-agent'),
    overrides: { logLevel: 'info', limits: BENCH_LIMITS, plans: WARM_PLANS, defaultPlan: 'cold' },
    compiled: !FROM_SOURCE,
  });
  cleanups.push(() => agent.stop());
  const client = new ConsumerClient({ sk: generateSecretKey(), provider: agent.pubkey, relays: [ctx.relay.url] });
  ctx.clients.push(client);
  await client.start();
  const warm = await measureWarm(agent, client, WARM_SAMPLES, (line) => console.error(line));
  await agent.stop();
  return warm;
}

/** BENCH_ONLY=warm: B6 alone, written and printed on its own. */
async function mainWarmOnly(): Promise<void> {
  const started = new Date();
  const loadBefore = os.loadavg();
  const root = mkdtempSync(path.join(os.tmpdir(), 'pga-bench-'));
  cleanups.push(() => rmSync(root, { recursive: true, force: true }));
  cleanups.push(() => stopAllMentioning(root));
  if (!FROM_SOURCE) {
    const build = await execa('npx', ['tsc', '-p', 'tsconfig.json'], { cwd: path.join(HERE, '..'), reject: false, all: true });
    if (build.exitCode !== 0) throw new Error(`npm run build failed:\n${String(build.all).slice(0, 4000)}`);
  }
  const relay = await startRelay();
  cleanups.push(() => relay.stop());
  const clients: ConsumerClient[] = [];
  cleanups.push(async () => {
    await Promise.allSettled(clients.map((c) => c.close()));
  });
  const b6 = await measureWarmPool({ root, relay, clients });
  const m = await machine();
  const record = { started_at: started.toISOString(), finished_at: new Date().toISOString(), machine: m, load_average: { before: loadBefore.map(r2), after: os.loadavg().map(r2) }, b6_warm: b6 };
  const file = writeResults(path.join(HERE, 'results'), record, '-warm');
  console.log(warmTable(b6, m));
  console.log(`\nwritten: ${path.relative(process.cwd(), file)}`);
}

async function main(): Promise<void> {
  if (ONLY_WARM) return mainWarmOnly();
  const started = new Date();
  const loadBefore = os.loadavg();
  const ctx = await setUp();

  // B4 (idle): connected, nothing to do for a few seconds.
  await sleep(3_000);
  const rssIdle = rss(ctx);
  console.error(`bench: B4 idle RSS ${r1(rssIdle.kb / 1024)} MB`);

  const sequential = await measureSequential(ctx);
  // The floor's p50 unrounded, as the ratios have always used it.
  const floorP50Ms = p50(sequential.spawn.floor_samples_ms);
  const { burst, memory } = await measureBurst(ctx, sequential.p50Ms, floorP50Ms, rssIdle);

  // B3: in this process, while the agent idles.
  console.error(`bench: B3 unwrapping ${WRAPS} wraps both ways...`);
  const unwrap = await benchUnwrap(WRAPS);

  // B6 last: its cloud guests would load the machine under every other measure.
  await ctx.agent.stop();
  const warm = await measureWarmPool(ctx);

  const results: BenchResults = {
    started_at: started.toISOString(),
    finished_at: new Date().toISOString(),
    machine: await machine(),
    load_average: { before: loadBefore.map(r2), after: os.loadavg().map(r2) },
    b1_spawn: sequential.spawn,
    agent_limits: BENCH_LIMITS,
    b2_burst: burst,
    b3_unwrap: unwrap,
    b4_memory: memory,
    b5_stop: sequential.stop,
    b6_warm: warm,
  };
  const file = writeResults(path.join(HERE, 'results'), results);
  console.log(table(results));
  console.log(`\nwritten: ${path.relative(process.cwd(), file)}`);
}

for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => {
    console.error(`bench: ${sig}, cleaning up`);
    void cleanupAll().finally(() => process.exit(130));
  });
}

main()
  .then(() => cleanupAll())
  .then(() => process.exit(0))
  .catch(async (err: unknown) => {
    console.error(`bench failed: ${(err as Error)?.stack ?? String(err)}`);
    await cleanupAll();
    process.exit(1);
  });
