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
 *   B5 stop: DM sent → qemu gone → reply received.
 * Prints a table and writes bench/results/<timestamp>.json. Everything it
 * starts (agent, relay, every qemu, temp dirs) is removed at the end, also on
 * failure or Ctrl-C.
 *
 * The agent runs as production runs it: compiled by `npm run build` (tsc) and
 * started with plain `node dist/src/cli/agent.js`; under tsx the loader alone
 * adds ~40 MB of RSS that B4 would otherwise charge to the agent.
 *
 * Environment: BENCH_SPAWNS (default 20), BENCH_WRAPS (default 1000),
 * BENCH_SOURCE=1 (run the TypeScript source under tsx, skip the build).
 */
import { execa } from 'execa';
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { generateSecretKey, getPublicKey, verifyEvent } from 'nostr-tools/pure';
import * as nip17 from 'nostr-tools/nip17';
import { ConsumerClient, type ReplyMessage } from '../src/client/consumer.js';
import { buildQemuArgv, vmFile } from '../src/drivers/kvm/argv.js';
import { findPids, findVmPids, isAlive, processArgv, readPidfile, stopIdentified, stopVmProcess } from '../src/drivers/kvm/process.js';
import { buildCloudConfig } from '../src/drivers/kvm/cloud-config.js';
import { canBind } from '../src/drivers/kvm/ports.js';
import { openDm, sealDmRequest } from '../src/nostr/dm.js';
import { ecdhBackend, signatureBackend, verifySignedEvent } from '../src/nostr/fast-crypto.js';
import type { NostrEvent } from '../src/nostr/types.js';
import { UnwrapPool } from '../src/nostr/unwrap-pool.js';
import { hashPassword } from '../src/util/sha512crypt.js';
import { startAgentProcess, type AgentProcess } from '../test/support/agent-process.js';
import { startRelay, type LocalRelay } from '../test/support/relay.js';
import { ensureTinyGuest, type TinyGuest } from '../test/support/tiny-guest.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const SPAWNS = Math.max(20, Number(process.env.BENCH_SPAWNS ?? 20));
const WRAPS = Math.max(100, Number(process.env.BENCH_WRAPS ?? 1000));
const BURST = 10;
const LIVE_LEASES = 5;
/** Ports well away from the tests' ranges; the floor gets its own slice. */
const AGENT_PORTS = { from: 47100, to: 47199 };
const FLOOR_PORTS = { from: 47200, to: 47299 };
const REPLY_TIMEOUT_MS = 120_000;
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
/** The agent's `tiny` plan (test/support/agent-process.ts); the floor launches the same VM. */
const PLAN = { id: 'tiny', vcpus: 1, memoryMb: 256, diskGb: 2 };

// --- small helpers -------------------------------------------------------------

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function quantile(xs: number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  // Nearest rank: a value that was really observed.
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
}
const p50 = (xs: number[]) => quantile(xs, 0.5);
const p95 = (xs: number[]) => quantile(xs, 0.95);
const r1 = (x: number) => Math.round(x * 10) / 10;
const r2 = (x: number) => Math.round(x * 100) / 100;

function password(): string {
  return randomBytes(15).toString('base64url');
}

function procStatusKb(pid: number, field: 'VmRSS' | 'VmHWM' | 'RssAnon' | 'RssFile'): number {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no ${field} for pid ${pid}`);
  return Number(m[1]);
}

/** Resolves with the time qemu `pid` was seen gone; polled finely (2 ms) so the stamp is accurate. */
async function watchGone(pid: number, timeoutMs: number): Promise<number> {
  const end = performance.now() + timeoutMs;
  while (await isAlive(pid)) {
    if (performance.now() > end) throw new Error(`qemu ${pid} still alive after ${timeoutMs} ms`);
    await sleep(2);
  }
  return performance.now();
}

/** Stop every process whose argv mentions `needle` (our temp root): qemus we or the agent started. One stuck pid does not stop the rest. */
async function stopAllMentioning(needle: string): Promise<void> {
  const mentions = async (pid: number) => (await processArgv(pid))?.some((a) => a.includes(needle)) ?? false;
  for (const pid of await findPids((argv) => argv.some((a) => a.includes(needle)))) {
    await stopIdentified(pid, () => mentions(pid), 5_000, `bench leftover ${pid}`).catch((err: Error) => console.error(`bench: ${err.message}`));
  }
}

async function freePort(range: { from: number; to: number }, taken: Set<number>): Promise<number> {
  for (let p = range.from; p <= range.to; p++) {
    if (taken.has(p)) continue;
    if (await canBind('127.0.0.1', p)) return p;
  }
  throw new Error(`no free port in ${range.from}-${range.to}`);
}

// --- the agent's phase log ------------------------------------------------------

interface Phases {
  overlay?: number;
  seed?: number;
  qemu?: number;
  pidfile?: number;
  /** QMP: attach the seed, start the paused VM. */
  start?: number;
  driverTotal?: number;
}

/** Per-phase times the driver logged for one workload (pino JSON lines). */
function phasesOf(agent: AgentProcess, workloadId: string): Phases {
  const out: Phases = {};
  for (const line of agent.output().split('\n')) {
    if (!line.includes(workloadId) || !line.includes('"phase"')) continue;
    let rec: Record<string, unknown>;
    try {
      rec = JSON.parse(line) as Record<string, unknown>;
    } catch {
      continue;
    }
    // The driver's child logger names it `workload`; the agent's request logger `workloadId`.
    if ((rec.workload ?? rec.workloadId) !== workloadId || typeof rec.ms !== 'number') continue;
    const phase = rec.phase as string;
    if (phase === 'overlay' || phase === 'seed' || phase === 'qemu' || phase === 'pidfile' || phase === 'start') out[phase] = rec.ms;
    if (phase === 'start' && typeof rec.totalMs === 'number') out.driverTotal = rec.totalMs;
  }
  return out;
}

// --- the run ----------------------------------------------------------------------

interface Ctx {
  root: string;
  guest: TinyGuest;
  relay: LocalRelay;
  agent: AgentProcess;
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

async function newClient(ctx: Ctx): Promise<ConsumerClient> {
  const c = new ConsumerClient({ sk: generateSecretKey(), provider: ctx.agent.pubkey, relays: [ctx.relay.url] });
  ctx.clients.push(c);
  await c.start();
  return c;
}

function expectType(r: ReplyMessage, type: string): void {
  if (r.type !== type) throw new Error(`expected a ${type} reply, got ${JSON.stringify(r).slice(0, 300)}`);
}

interface SpawnSample {
  e2eMs: number;
  workloadId: string;
  phases: Phases;
}

async function spawnOnce(client: ConsumerClient): Promise<SpawnSample> {
  const t0 = performance.now();
  const r = await client.request({ type: 'spawn', root_password: password(), plan: PLAN.id }, { timeoutMs: REPLY_TIMEOUT_MS });
  const e2eMs = performance.now() - t0;
  expectType(r, 'access_details');
  const workloadId = String(r.workload_id);
  return { e2eMs, workloadId, phases: {} };
}

interface StopSample {
  replyMs: number;
  goneMs: number;
}

async function stopOnce(client: ConsumerClient, workloadId: string): Promise<StopSample> {
  const [pid] = await findVmPids(`paygress-${workloadId}`);
  if (pid === undefined) throw new Error(`no qemu found for ${workloadId}`);
  const t0 = performance.now();
  const gone = watchGone(pid, REPLY_TIMEOUT_MS);
  const r = await client.request({ type: 'stop', workload_id: workloadId }, { timeoutMs: REPLY_TIMEOUT_MS });
  const replyAt = performance.now();
  expectType(r, 'stopped');
  return { replyMs: replyAt - t0, goneMs: (await gone) - t0 };
}

interface FloorSample {
  overlay_ms: number;
  seed_ms: number;
  qemu_ms: number;
  total_ms: number;
  wall_ms: number;
}

interface FloorRun {
  /** Runs floor.sh; resolves with its step times once `qemu -daemonize` returned. */
  run(): Promise<FloorSample>;
  /** Stops the floor's qemu and removes its folder. */
  cleanup(): Promise<void>;
}

/** Everything the floor needs before its clock starts: folder, port, the agent's own argv for the same VM. */
async function prepareFloor(ctx: Ctx, i: number, taken: Set<number>): Promise<FloorRun> {
  const name = `pgbench-floor-${i}`;
  const dir = path.join(ctx.root, 'floor', String(i));
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const port = await freePort(FLOOR_PORTS, taken);
  taken.add(port);
  const argv = buildQemuArgv({
    accel: 'tcg',
    name,
    uuid: randomUUID(),
    dir,
    vcpus: PLAN.vcpus,
    memoryMb: PLAN.memoryMb,
    bindAddress: '127.0.0.1',
    sshPort: port,
    kernel: ctx.guest.kernel,
    initrd: ctx.guest.initrd,
    append: ctx.guest.append,
    // The agent's default guest network (config drivers.kvm.network).
    network: 'restricted',
    // The naive sequence: seed on the command line, the VM runs at once.
    seedAtStart: true,
  });
  const argvFile = path.join(ctx.root, 'floor', `${i}.argv`);
  writeFileSync(argvFile, argv.map((a) => `${a}\0`).join(''));
  return {
    async run() {
      const t0 = performance.now();
      const res = await execa('bash', [path.join(HERE, 'floor.sh'), dir, ctx.guest.baseImage, 'qcow2', String(PLAN.diskGb), ctx.floorSeed, argvFile], {
        stdin: 'ignore',
        reject: false,
      });
      const wall = performance.now() - t0;
      if (res.exitCode !== 0) throw new Error(`floor.sh failed: ${res.stderr}`);
      return { ...(JSON.parse(res.stdout) as Omit<FloorSample, 'wall_ms'>), wall_ms: wall };
    },
    async cleanup() {
      const pid = await readPidfile(vmFile(dir, 'pidfile'));
      if (pid !== undefined) await stopVmProcess(pid, name, 5_000);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

async function floorOnce(ctx: Ctx, i: number): Promise<FloorSample> {
  const f = await prepareFloor(ctx, i, new Set());
  try {
    return await f.run();
  } finally {
    await f.cleanup();
  }
}

/** The agent's receive path for one wrap as it comes off the wire: pool signature check, then openDm. */
function agentUnwrap(raw: string, sk: Uint8Array, pk: string): void {
  const ev = JSON.parse(raw) as NostrEvent;
  if (!verifySignedEvent(ev)) throw new Error('bench wrap failed verification');
  const opened = openDm(ev, sk, pk);
  if (!opened.ok) throw new Error(`bench wrap did not open: ${opened.reason}`);
}

function plainUnwrap(raw: string, sk: Uint8Array): void {
  nip17.unwrapEvent(JSON.parse(raw) as NostrEvent, sk);
}

/** nostr-tools doing the same checks as the agent: the wrap's signature too (nip17.unwrapEvent skips it). */
function sameChecksUnwrap(raw: string, sk: Uint8Array): void {
  const ev = JSON.parse(raw) as NostrEvent;
  if (!verifyEvent(ev)) throw new Error('bench wrap failed verification');
  nip17.unwrapEvent(ev, sk);
}

/** Frames handed to the receive path per event-loop turn: about one 64 KiB socket read of ~3 KB gift wraps. */
const FRAMES_PER_TURN = 20;

/**
 * A flood as the agent meets it: every wrap arrives as a frame, FRAMES_PER_TURN
 * per event-loop turn, goes through the relay pool's signature check and then
 * `open`. Measures wall time until every wrap is open and the event-loop delay
 * (monitorEventLoopDelay, 1 ms resolution) meanwhile: how long anything else
 * waiting on the main thread (another request's reply, a relay ping) waits.
 */
async function flood(
  raws: string[],
  open: (ev: NostrEvent) => Promise<{ ok: boolean }> | { ok: boolean },
): Promise<{ wallMs: number; loopP99Ms: number; loopMaxMs: number }> {
  const h = monitorEventLoopDelay({ resolution: 1 });
  h.enable();
  const t0 = performance.now();
  const opened: (Promise<{ ok: boolean }> | { ok: boolean })[] = [];
  for (let i = 0; i < raws.length; i += FRAMES_PER_TURN) {
    for (const r of raws.slice(i, i + FRAMES_PER_TURN)) {
      const ev = JSON.parse(r) as NostrEvent;
      if (!verifySignedEvent(ev)) throw new Error('bench wrap failed verification');
      opened.push(open(ev));
    }
    await new Promise<void>((res) => setImmediate(res));
  }
  const results = await Promise.all(opened);
  const wallMs = performance.now() - t0;
  h.disable();
  if (!results.every((x) => x.ok)) throw new Error('bench wrap did not open');
  return { wallMs, loopP99Ms: h.percentile(99) / 1e6, loopMaxMs: h.max / 1e6 };
}

/**
 * The pool beside nostr-tools and the old synchronous path, back to back on the
 * same wraps: nostr-tools sequential (one thread, no wrap signature check), the
 * agent's previous receive path (openDm synchronously in the frame handler),
 * then the UnwrapPool (fresh, so worker start-up is inside its wall time).
 */
async function benchPool(raws: string[], sk: Uint8Array, pk: string): Promise<Record<string, unknown>> {
  let t = performance.now();
  for (const r of raws) plainUnwrap(r, sk);
  const plainMs = performance.now() - t;
  const sync = await flood(raws, (ev) => openDm(ev, sk, pk));
  const pool = new UnwrapPool({ sk, pubkey: pk });
  const pooled = await flood(raws, (ev) => pool.open(ev));
  const stats = pool.stats();
  await pool.close();
  t = performance.now();
  for (const r of raws) plainUnwrap(r, sk);
  const plainAfterMs = performance.now() - t;
  const plainBoth = (plainMs + plainAfterMs) / 2;
  return {
    workers: pool.size,
    nostr_tools_sequential_wall_ms: r1(plainBoth),
    nostr_tools_sequential_runs_ms: [r1(plainMs), r1(plainAfterMs)],
    pool_wall_ms: r1(pooled.wallMs),
    pool_wraps_per_s: Math.round((raws.length / pooled.wallMs) * 1000),
    pool_ratio: r2(plainBoth / pooled.wallMs),
    sync_wall_ms: r1(sync.wallMs),
    sync_ratio: r2(plainBoth / sync.wallMs),
    loop_delay_p99_ms: { pool: r1(pooled.loopP99Ms), sync: r1(sync.loopP99Ms) },
    loop_delay_max_ms: { pool: r1(pooled.loopMaxMs), sync: r1(sync.loopMaxMs) },
    opened_in_workers: stats.openedInWorkers,
    opened_on_main: stats.openedOnMain,
    method: `all ${raws.length} wraps fed ${FRAMES_PER_TURN} frames per event-loop turn, each JSON.parse + relay-pool signature check, then openDm synchronously (sync) or UnwrapPool.open (pool, fresh: worker start-up included; workers are told the wrap signature was checked); ratio = nostr-tools sequential wall (mean of a run before and after) / wall`,
  };
}

/** @rust-nostr/nostr-sdk (a dev dependency) as a third unwrap implementation; undefined when it is not installed. */
async function loadRustNostr(sk: Uint8Array): Promise<{ version: string; unwrap(raw: string): Promise<void> } | undefined> {
  interface Freeable {
    free(): void;
  }
  interface RustNostr {
    loadWasmSync(): void;
    Keys: { parse(secret: string): unknown };
    NostrSigner: { keys(keys: unknown): unknown };
    Event: { fromJson(json: string): Freeable };
    UnwrappedGift: { fromGiftWrap(signer: unknown, ev: Freeable): Promise<Freeable & { rumor: { content: string } }> };
  }
  let mod: RustNostr;
  const name = '@rust-nostr/nostr-sdk';
  try {
    mod = (await import(name)) as RustNostr;
  } catch {
    return undefined;
  }
  mod.loadWasmSync();
  const signer = mod.NostrSigner.keys(mod.Keys.parse(Buffer.from(sk).toString('hex')));
  const version = (JSON.parse(readFileSync(createRequire(import.meta.url).resolve(`${name}/package.json`), 'utf8')) as { version: string }).version;
  return {
    version,
    async unwrap(raw: string) {
      const ev = mod.Event.fromJson(raw);
      try {
        const gift = await mod.UnwrappedGift.fromGiftWrap(signer, ev);
        if (!gift.rumor.content.includes('spawn')) throw new Error('rust-nostr unwrapped something else');
        gift.free();
      } finally {
        ev.free();
      }
    },
  };
}

async function benchUnwrap(): Promise<Record<string, unknown>> {
  const sk = generateSecretKey();
  const pk = getPublicKey(sk);
  // 1000 distinct senders: no conversation-key cache hit flatters the fast path.
  const raws: string[] = [];
  const content = JSON.stringify({ type: 'spawn', root_password: 'bench-password-123', plan: 'tiny' });
  for (let i = 0; i < WRAPS; i++) {
    raws.push(JSON.stringify(sealDmRequest({ sk: generateSecretKey(), recipient: pk, content, channel: 'nip17' }).event));
  }
  // Warm both paths (JIT, WASM tier-up), then alternate in chunks so machine-load swings hit both alike.
  for (const r of raws.slice(0, 20)) {
    plainUnwrap(r, sk);
    sameChecksUnwrap(r, sk);
    agentUnwrap(r, sk, pk);
  }
  const rust = await loadRustNostr(sk);
  if (rust) for (const r of raws.slice(0, 20)) await rust.unwrap(r);
  let plainMs = 0;
  let sameMs = 0;
  let fastMs = 0;
  let rustMs = 0;
  const CHUNK = 50;
  for (let i = 0; i < raws.length; i += CHUNK) {
    const chunk = raws.slice(i, i + CHUNK);
    let t = performance.now();
    for (const r of chunk) plainUnwrap(r, sk);
    plainMs += performance.now() - t;
    t = performance.now();
    for (const r of chunk) sameChecksUnwrap(r, sk);
    sameMs += performance.now() - t;
    t = performance.now();
    for (const r of chunk) agentUnwrap(r, sk, pk);
    fastMs += performance.now() - t;
    if (rust) {
      t = performance.now();
      for (const r of chunk) await rust.unwrap(r);
      rustMs += performance.now() - t;
    }
  }
  const pool = await benchPool(raws, sk, pk);
  const rustSdk = rust
    ? {
        version: rust.version,
        path: 'Event.fromJson + UnwrappedGift.fromGiftWrap (rust-nostr compiled to WASM: two ECDH, seal signature; the wrap signature is not checked, the agent path checks it)',
        ms_per_wrap: r2(rustMs / raws.length),
        wraps_per_s: Math.round((raws.length / rustMs) * 1000),
        agent_ratio: r2(rustMs / fastMs),
      }
    : 'not installed (skipped)';
  return {
    wraps: raws.length,
    senders: raws.length,
    signature_backend: signatureBackend,
    ecdh_backend: ecdhBackend,
    nostr_tools_ms_per_wrap: r2(plainMs / raws.length),
    nostr_tools_wraps_per_s: Math.round((raws.length / plainMs) * 1000),
    agent_ms_per_wrap: r2(fastMs / raws.length),
    agent_wraps_per_s: Math.round((raws.length / fastMs) * 1000),
    ratio: r2(plainMs / fastMs),
    nostr_tools_same_checks_ms_per_wrap: r2(sameMs / raws.length),
    ratio_same_checks: r2(sameMs / fastMs),
    threads: 'ratio / ratio_same_checks: one thread (this process, one core), paths alternate in chunks of 50; pool: see below',
    agent_path: 'relay-pool signature check of the wrap + openDm (seal signature, two ECDH, two NIP-44 decrypts)',
    nostr_tools_path: 'nip17.unwrapEvent (two ECDH, seal signature; no wrap signature check)',
    nostr_tools_same_checks_path: 'verifyEvent(wrap) + nip17.unwrapEvent: the checks the agent makes',
    rust_nostr_sdk: rustSdk,
    pool,
  };
}

async function machine(): Promise<Record<string, unknown>> {
  const qemu = await execa('qemu-system-x86_64', ['--version'], { reject: false });
  return {
    cpu: os.cpus()[0]?.model ?? 'unknown',
    cores: os.cpus().length,
    memory_gb: r1(os.totalmem() / 2 ** 30),
    kernel: os.release(),
    os: (() => {
      try {
        return /PRETTY_NAME="([^"]+)"/.exec(readFileSync('/etc/os-release', 'utf8'))?.[1] ?? os.type();
      } catch {
        return os.type();
      }
    })(),
    node: process.version,
    qemu: String(qemu.stdout).split('\n')[0] ?? 'unknown',
    accel: 'tcg (-cpu max)',
    guest: 'tiny (Debian cloud kernel + busybox initramfs)',
  };
}

async function main(): Promise<void> {
  const started = new Date();
  const root = mkdtempSync(path.join(os.tmpdir(), 'pga-bench-'));
  cleanups.push(() => rmSync(root, { recursive: true, force: true }));
  // Anything still running that mentions our root (agent-made or floor qemus) dies last-but-one.
  cleanups.push(async () => {
    await stopAllMentioning(root);
  });
  const loadBefore = os.loadavg();
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

  // The floor's seed: the same cloud-config the driver writes, with a hash made once (not a floor step).
  const floorSeed = path.join(root, 'floor-seed');
  mkdirSync(floorSeed, { recursive: true, mode: 0o700 });
  const seed = buildCloudConfig({
    hostname: 'pgbench-floor',
    passwordHash: hashPassword(password()),
    sshKeys: [],
    finalMessageToken: randomBytes(12).toString('base64url'),
    instanceId: `pgbench-floor-${randomUUID()}`,
  });
  writeFileSync(path.join(floorSeed, 'user-data'), seed.userData, { mode: 0o600 });
  writeFileSync(path.join(floorSeed, 'meta-data'), seed.metaData, { mode: 0o600 });

  const ctx: Ctx = { root, guest, relay, agent, clients: [], floorSeed };
  cleanups.push(async () => {
    await Promise.allSettled(ctx.clients.map((c) => c.close()));
  });

  // B4 (idle): connected, nothing to do for a few seconds.
  await sleep(3_000);
  const rssIdleKb = procStatusKb(agentPid, 'VmRSS');
  // File-backed pages are mostly the node binary's own code, shared with every node process.
  const rssIdleSplit = { anon_mb: r1(procStatusKb(agentPid, 'RssAnon') / 1024), file_mb: r1(procStatusKb(agentPid, 'RssFile') / 1024) };
  console.error(`bench: B4 idle RSS ${r1(rssIdleKb / 1024)} MB`);

  // B1 + B5: sequential spawn → stop, interleaved with the floor.
  const main = await newClient(ctx);
  // One unmeasured round trip: connections, JIT and the accel probe are not what a user waits for each time.
  {
    const s = await spawnOnce(main);
    await stopOnce(main, s.workloadId);
  }
  const spawns: SpawnSample[] = [];
  const stops: StopSample[] = [];
  const floors: FloorSample[] = [];
  for (let i = 0; i < SPAWNS; i++) {
    floors.push(await floorOnce(ctx, i));
    const s = await spawnOnce(main);
    s.phases = phasesOf(agent, s.workloadId);
    spawns.push(s);
    stops.push(await stopOnce(main, s.workloadId));
    console.error(
      `bench: B1 #${i + 1}: spawn ${r1(s.e2eMs)} ms (floor ${floors[i]!.total_ms} ms), stop reply ${r1(stops[i]!.replyMs)} ms`,
    );
  }

  // B2: ten consumers at once.
  const burstClients = await Promise.all(Array.from({ length: BURST }, () => newClient(ctx)));
  const b0 = performance.now();
  const burst = await Promise.all(
    burstClients.map(async (c) => {
      const s = await spawnOnce(c);
      return { ...s, doneAt: performance.now() - b0 };
    }),
  );
  const burstMs = performance.now() - b0;
  console.error(`bench: B2 burst of ${BURST}: ${r1(burstMs)} ms`);
  await Promise.all(burst.map((s, i) => stopOnce(burstClients[i]!, s.workloadId)));

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
  const live = await Promise.all(burstClients.slice(0, LIVE_LEASES).map((c) => spawnOnce(c)));
  await sleep(2_000);
  const rssLeasesKb = procStatusKb(agentPid, 'VmRSS');
  const rssLeasesSplit = { anon_mb: r1(procStatusKb(agentPid, 'RssAnon') / 1024), file_mb: r1(procStatusKb(agentPid, 'RssFile') / 1024) };
  console.error(`bench: B4 RSS with ${LIVE_LEASES} leases ${r1(rssLeasesKb / 1024)} MB`);
  await Promise.all(live.map((s, i) => stopOnce(burstClients[i]!, s.workloadId)));
  const rssPeakKb = procStatusKb(agentPid, 'VmHWM');

  // B3: in this process, while the agent idles.
  console.error(`bench: B3 unwrapping ${WRAPS} wraps both ways...`);
  const unwrap = await benchUnwrap();

  const e2e = spawns.map((s) => s.e2eMs);
  const floorTotal = floors.map((f) => f.total_ms);
  const single = p50(e2e);
  const phase = (k: keyof Phases) => {
    const xs = spawns.map((s) => s.phases[k]).filter((x): x is number => typeof x === 'number');
    return { p50: r1(p50(xs)), p95: r1(p95(xs)) };
  };
  const dmPath = spawns
    .filter((s) => typeof s.phases.driverTotal === 'number')
    .map((s) => s.e2eMs - s.phases.driverTotal!);

  const results = {
    started_at: started.toISOString(),
    finished_at: new Date().toISOString(),
    machine: await machine(),
    load_average: { before: loadBefore.map(r2), after: os.loadavg().map(r2) },
    b1_spawn: {
      samples: spawns.length,
      p50_ms: r1(single),
      p95_ms: r1(p95(e2e)),
      floor_p50_ms: r1(p50(floorTotal)),
      floor_p95_ms: r1(p95(floorTotal)),
      ratio_p50: r2(single / p50(floorTotal)),
      phases_ms: {
        overlay: phase('overlay'),
        seed: phase('seed'),
        qemu: phase('qemu'),
        pidfile: phase('pidfile'),
        start: phase('start'),
        driver_total: phase('driverTotal'),
        dm_and_agent: { p50: r1(p50(dmPath)), p95: r1(p95(dmPath)) },
      },
      floor_phases_ms: {
        overlay: r1(p50(floors.map((f) => f.overlay_ms))),
        seed: r1(p50(floors.map((f) => f.seed_ms))),
        qemu: r1(p50(floors.map((f) => f.qemu_ms))),
      },
      e2e_samples_ms: e2e.map(r1),
      floor_samples_ms: floorTotal,
    },
    agent_limits: BENCH_LIMITS,
    b2_burst: {
      consumers: BURST,
      all_replied_ms: r1(burstMs),
      sequential_estimate_ms: r1(BURST * single),
      ratio: r2(burstMs / (BURST * single)),
      reply_times_ms: burst.map((b) => r1(b.doneAt)).sort((a, b) => a - b),
      floor_burst_ms: r1(floorBurstMs),
      floor_burst_ratio: r2(floorBurstMs / (BURST * p50(floorTotal))),
      vs_floor_burst: r2(burstMs / floorBurstMs),
      floor_burst_note: 'the same ten overlay + seed + qemu -daemonize sequences run from a shell at once (no Nostr, no agent); what this machine allows',
    },
    b3_unwrap: unwrap,
    b4_memory: {
      idle_rss_mb: r1(rssIdleKb / 1024),
      rss_with_leases_mb: r1(rssLeasesKb / 1024),
      leases: LIVE_LEASES,
      peak_rss_mb: r1(rssPeakKb / 1024),
      idle_split: rssIdleSplit,
      leases_split: rssLeasesSplit,
      note: FROM_SOURCE
        ? 'agent child process (node --import tsx src/cli/agent.ts), /proc/<pid>/status'
        : 'agent child process (node dist/src/cli/agent.js, built by tsc), /proc/<pid>/status',
    },
    b5_stop: {
      samples: stops.length,
      reply_p50_ms: r1(p50(stops.map((s) => s.replyMs))),
      reply_p95_ms: r1(p95(stops.map((s) => s.replyMs))),
      qemu_gone_p50_ms: r1(p50(stops.map((s) => s.goneMs))),
      qemu_gone_p95_ms: r1(p95(stops.map((s) => s.goneMs))),
    },
  };

  const dirOut = path.join(HERE, 'results');
  mkdirSync(dirOut, { recursive: true });
  const file = path.join(dirOut, `${started.toISOString().replace(/:/g, '-').replace(/\.\d+Z$/, 'Z')}.json`);
  writeFileSync(file, `${JSON.stringify(results, null, 2)}\n`);
  console.log(table(results));
  console.log(`\nwritten: ${path.relative(process.cwd(), file)}`);
}

function table(r: any): string {
  const m = r.machine;
  const b1 = r.b1_spawn;
  const ph = b1.phases_ms;
  const rows: [string, string, string, string, string][] = [
    ['B1 spawn latency p50 / p95', `${b1.p50_ms} / ${b1.p95_ms} ms`, `floor ${b1.floor_p50_ms} / ${b1.floor_p95_ms} ms`, `${b1.ratio_p50}×`, '≤ 1.5×'],
    ['  phases p50: overlay / seed / qemu / pidfile / seed attach + start', `${ph.overlay.p50} / ${ph.seed.p50} / ${ph.qemu.p50} / ${ph.pidfile.p50} / ${ph.start.p50} ms`, `floor ${b1.floor_phases_ms.overlay} / ${b1.floor_phases_ms.seed} / ${b1.floor_phases_ms.qemu} ms`, '', ''],
    ['  driver total p50 (the seed runs beside overlay + qemu)', `${ph.driver_total.p50} ms`, `floor ${b1.floor_p50_ms} ms`, '', ''],
    ['  DM + agent overhead p50', `${ph.dm_and_agent.p50} ms`, '', '', ''],
    [`B2 burst, ${r.b2_burst.consumers} consumers`, `${r.b2_burst.all_replied_ms} ms`, `10 × p50 = ${r.b2_burst.sequential_estimate_ms} ms`, `${r.b2_burst.ratio}`, '≤ 0.5'],
    [`  B2 floor: ${r.b2_burst.consumers} shell sequences at once`, `${r.b2_burst.floor_burst_ms} ms`, `10 × floor p50 = ${r1(r.b2_burst.consumers * b1.floor_p50_ms)} ms`, `${r.b2_burst.floor_burst_ratio}`, ''],
    ['  B2 agent burst / floor burst', '', '', `${r.b2_burst.vs_floor_burst}×`, ''],
    [`B3 unwrap, ${r.b3_unwrap.wraps} wraps`, `${r.b3_unwrap.agent_ms_per_wrap} ms/wrap (${r.b3_unwrap.agent_wraps_per_s}/s)`, `nostr-tools ${r.b3_unwrap.nostr_tools_ms_per_wrap} ms/wrap (${r.b3_unwrap.nostr_tools_wraps_per_s}/s)`, `${r.b3_unwrap.ratio}×`, '≥ 4×'],
    ['  B3 same checks (nostr-tools also verifies the wrap)', `${r.b3_unwrap.agent_ms_per_wrap} ms/wrap`, `nostr-tools ${r.b3_unwrap.nostr_tools_same_checks_ms_per_wrap} ms/wrap`, `${r.b3_unwrap.ratio_same_checks}×`, ''],
    [`  B3 flood, UnwrapPool (${r.b3_unwrap.pool.workers} worker${r.b3_unwrap.pool.workers === 1 ? '' : 's'}): wall for all, 2 cores`, `${r.b3_unwrap.pool.pool_wall_ms} ms (${r.b3_unwrap.pool.pool_wraps_per_s}/s)`, `nostr-tools sequential ${r.b3_unwrap.pool.nostr_tools_sequential_wall_ms} ms`, `${r.b3_unwrap.pool.pool_ratio}×`, '≥ 4×'],
    ['  B3 flood, old path (openDm in the frame handler): wall for all', `${r.b3_unwrap.pool.sync_wall_ms} ms`, `nostr-tools sequential ${r.b3_unwrap.pool.nostr_tools_sequential_wall_ms} ms`, `${r.b3_unwrap.pool.sync_ratio}×`, ''],
    ['  B3 flood, event-loop delay p99 / max', `pool ${r.b3_unwrap.pool.loop_delay_p99_ms.pool} / ${r.b3_unwrap.pool.loop_delay_max_ms.pool} ms`, `old path ${r.b3_unwrap.pool.loop_delay_p99_ms.sync} / ${r.b3_unwrap.pool.loop_delay_max_ms.sync} ms`, '', ''],
    typeof r.b3_unwrap.rust_nostr_sdk === 'object'
      ? [`  B3 against rust-nostr ${r.b3_unwrap.rust_nostr_sdk.version} (WASM; checks the seal's signature, not the wrap's, which the agent also checks)`, `${r.b3_unwrap.agent_ms_per_wrap} ms/wrap`, `rust-nostr ${r.b3_unwrap.rust_nostr_sdk.ms_per_wrap} ms/wrap`, `${r.b3_unwrap.rust_nostr_sdk.agent_ratio}×`, '']
      : ['  B3 @rust-nostr/nostr-sdk', String(r.b3_unwrap.rust_nostr_sdk), '', '', ''],
    ['B4 agent RSS idle / 5 leases', `${r.b4_memory.idle_rss_mb} / ${r.b4_memory.rss_with_leases_mb} MB`, `peak ${r.b4_memory.peak_rss_mb} MB`, '', '≤ 80 / ≤ 100 MB'],
    ['B5 stop: qemu gone / reply p50', `${r.b5_stop.qemu_gone_p50_ms} / ${r.b5_stop.reply_p50_ms} ms`, `p95 ${r.b5_stop.qemu_gone_p95_ms} / ${r.b5_stop.reply_p95_ms} ms`, '', '≤ 1 s'],
  ];
  const head = ['measure', 'agent', 'baseline', 'ratio', 'target'];
  const lines = [
    `Machine: ${m.cpu}, ${m.cores} cores, ${m.memory_gb} GB, ${m.os}, kernel ${m.kernel}, Node ${m.node}, ${m.qemu}, ${m.accel}`,
    `Load average before/after: ${r.load_average.before.join(' ')} / ${r.load_average.after.join(' ')}; run ${r.started_at}`,
    '',
    `| ${head.join(' | ')} |`,
    `| ${head.map(() => '---').join(' | ')} |`,
    ...rows.map((row) => `| ${row.join(' | ')} |`),
  ];
  return lines.join('\n');
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
