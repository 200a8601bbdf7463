/**
 * The record a bench run writes to bench/results/<timestamp>.json: its shape
 * is what earlier results files hold, so runs stay comparable. Durations in
 * milliseconds, sizes in MB.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type { Spread } from './stats.js';

export interface MachineInfo {
  cpu: string;
  cores: number;
  memory_gb: number;
  kernel: string;
  os: string;
  node: string;
  qemu: string;
  accel: string;
  guest: string;
}

export interface SpawnResults {
  samples: number;
  p50_ms: number;
  p95_ms: number;
  floor_p50_ms: number;
  floor_p95_ms: number;
  ratio_p50: number;
  phases_ms: {
    overlay: Spread;
    seed: Spread;
    qemu: Spread;
    pidfile: Spread;
    start: Spread;
    driver_total: Spread;
    /** End to end minus the driver's total: Nostr both ways plus the agent's own work. */
    dm_and_agent: Spread;
  };
  floor_phases_ms: { overlay: number; seed: number; qemu: number };
  e2e_samples_ms: number[];
  floor_samples_ms: number[];
}

export interface BurstResults {
  consumers: number;
  all_replied_ms: number;
  sequential_estimate_ms: number;
  ratio: number;
  reply_times_ms: number[];
  floor_burst_ms: number;
  floor_burst_ratio: number;
  vs_floor_burst: number;
  floor_burst_note: string;
}

export interface RustNostrResults {
  version: string;
  path: string;
  ms_per_wrap: number;
  wraps_per_s: number;
  agent_ratio: number;
}

export interface PoolResults {
  workers: number;
  nostr_tools_sequential_wall_ms: number;
  nostr_tools_sequential_runs_ms: number[];
  pool_wall_ms: number;
  pool_wraps_per_s: number;
  pool_ratio: number;
  sync_wall_ms: number;
  sync_ratio: number;
  loop_delay_p99_ms: { pool: number; sync: number };
  loop_delay_max_ms: { pool: number; sync: number };
  opened_in_workers: number;
  opened_on_main: number;
  method: string;
}

export interface UnwrapResults {
  wraps: number;
  senders: number;
  signature_backend: string;
  ecdh_backend: string;
  nostr_tools_ms_per_wrap: number;
  nostr_tools_wraps_per_s: number;
  agent_ms_per_wrap: number;
  agent_wraps_per_s: number;
  ratio: number;
  nostr_tools_same_checks_ms_per_wrap: number;
  ratio_same_checks: number;
  threads: string;
  agent_path: string;
  nostr_tools_path: string;
  nostr_tools_same_checks_path: string;
  /** A sentence when the package is not installed. */
  rust_nostr_sdk: RustNostrResults | string;
  pool: PoolResults;
}

export interface RssSplit {
  anon_mb: number;
  file_mb: number;
}

export interface MemoryResults {
  idle_rss_mb: number;
  rss_with_leases_mb: number;
  leases: number;
  peak_rss_mb: number;
  idle_split: RssSplit;
  leases_split: RssSplit;
  note: string;
}

export interface StopResults {
  samples: number;
  reply_p50_ms: number;
  reply_p95_ms: number;
  qemu_gone_p50_ms: number;
  qemu_gone_p95_ms: number;
}

export interface WarmResults {
  samples: number;
  pool_size: number;
  plan: { vcpus: number; memoryMb: number; diskGb: number };
  /** DM sent → `ready` received. */
  pool_ready_p50_ms: number;
  pool_ready_p95_ms: number;
  cold_ready_p50_ms: number;
  cold_ready_p95_ms: number;
  /** DM sent → `access_details` received. */
  pool_access_p50_ms: number;
  cold_access_p50_ms: number;
  speedup_p50: number;
  pool_samples_ms: number[];
  cold_samples_ms: number[];
  idle_cpu_pct_per_vm: number;
  idle_rss_mb_per_vm: number;
  guest: string;
}

export interface BenchResults {
  started_at: string;
  finished_at: string;
  machine: MachineInfo;
  load_average: { before: number[]; after: number[] };
  b1_spawn: SpawnResults;
  /** The agent's config `limits` during the run. */
  agent_limits: Record<string, unknown>;
  b2_burst: BurstResults;
  b3_unwrap: UnwrapResults;
  b4_memory: MemoryResults;
  b5_stop: StopResults;
  b6_warm?: WarmResults;
}

/** Write the record as bench/results/<start time><suffix>.json; returns the path. */
export function writeResults(dir: string, results: { started_at: string }, suffix = ''): string {
  mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${results.started_at.replace(/:/g, '-').replace(/\.\d+Z$/, 'Z')}${suffix}.json`);
  writeFileSync(file, `${JSON.stringify(results, null, 2)}\n`);
  return file;
}
