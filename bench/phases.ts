/**
 * The phase-timing contract (docs/logs.md): while it creates a workload the
 * agent writes one JSON log line per phase, carrying `workloadId`, `phase`
 * and `ms`; the `start` line also carries `totalMs`. This module is the one
 * reader of that contract. Total: any other line is skipped.
 */

/** The phases of a spawn as the KVM driver logs them, in the order they end (seed runs beside overlay and qemu). */
export const SPAWN_PHASES = ['overlay', 'seed', 'qemu', 'pidfile', 'start'] as const;
export type SpawnPhase = (typeof SPAWN_PHASES)[number];

export interface PhaseRecord {
  workloadId: string;
  phase: string;
  ms: number;
  /** Only on `start`: the driver's whole create. */
  totalMs?: number;
}

export type SpawnPhases = Partial<Record<SpawnPhase, number>> & { driverTotal?: number };

/** One log line read against the contract; undefined for every line that is not a phase record. */
export function parsePhaseLine(line: string): PhaseRecord | undefined {
  if (!line.includes('"phase"')) return undefined;
  let rec: unknown;
  try {
    rec = JSON.parse(line);
  } catch {
    return undefined;
  }
  if (typeof rec !== 'object' || rec === null) return undefined;
  const { workloadId, phase, ms, totalMs } = rec as Record<string, unknown>;
  if (typeof workloadId !== 'string' || typeof phase !== 'string' || typeof ms !== 'number' || !Number.isFinite(ms)) return undefined;
  return typeof totalMs === 'number' && Number.isFinite(totalMs) ? { workloadId, phase, ms, totalMs } : { workloadId, phase, ms };
}

/** The spawn phases one workload's create logged, from the agent's output (JSON lines). */
export function spawnPhasesOf(output: string, workloadId: string): SpawnPhases {
  const out: SpawnPhases = {};
  for (const line of output.split('\n')) {
    if (!line.includes(workloadId)) continue;
    const rec = parsePhaseLine(line);
    if (rec?.workloadId !== workloadId || !isSpawnPhase(rec.phase)) continue;
    out[rec.phase] = rec.ms;
    if (rec.phase === 'start' && rec.totalMs !== undefined) out.driverTotal = rec.totalMs;
  }
  return out;
}

function isSpawnPhase(phase: string): phase is SpawnPhase {
  return (SPAWN_PHASES as readonly string[]).includes(phase);
}
