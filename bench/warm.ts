/**
 * B6: DM sent → `ready` received (root's password login works) from the warm
 * pool, beside the cold path in the same run on the same agent; and what an
 * idle pool VM costs the host.
 *
 * One agent, the cloud guest, two plans of the same size: `pooled`
 * (warmPool: WARM_POOL) and `cold` (no pool). Samples alternate pool and cold,
 * and each starts only once the pool is full again and nothing else runs, so
 * both see the same machine: WARM_POOL idle guests and nothing booting.
 */
import { readFileSync } from 'node:fs';
import type { ConsumerClient, ReplyMessage } from '../src/client/consumer.js';
import { findPids } from '../src/drivers/kvm/process.js';
import type { AgentProcess } from '../test/support/agent-process.js';
import { procStatusKb } from './machine.js';
import type { WarmResults } from './results.js';
import { password, stopOnce } from './spawn.js';
import { p50, p95, r1, r2 } from './stats.js';

export const WARM_POOL = 2;
const SIZE = { vcpus: 1, memoryMb: 768, diskGb: 3, durationSeconds: 3600 };
export const WARM_PLANS = [
  { id: 'pooled', name: 'Pooled', description: 'bench: from the warm pool', ...SIZE, warmPool: WARM_POOL },
  { id: 'cold', name: 'Cold', description: 'bench: a cold boot', ...SIZE },
];
/** A cold cloud guest needs about a minute under TCG; a loaded machine several. */
const READY_TIMEOUT_MS = 600_000;
const IDLE_COST_WINDOW_MS = 20_000;
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

interface ReadySample {
  accessMs: number;
  readyMs: number;
  workloadId: string;
}

async function spawnUntilReady(client: ConsumerClient, plan: string): Promise<ReadySample> {
  const t0 = performance.now();
  let accessMs = 0;
  const r = await client.request(
    { type: 'spawn', root_password: password(), plan },
    {
      timeoutMs: READY_TIMEOUT_MS,
      onProgress: (m: ReplyMessage) => {
        if (m.type === 'access_details') accessMs = performance.now() - t0;
      },
      done: (m) => m.type === 'ready' || m.type === 'boot_failed',
    },
  );
  const readyMs = performance.now() - t0;
  if (r.type !== 'ready') throw new Error(`plan ${plan}: expected ready, got ${JSON.stringify(r).slice(0, 300)}`);
  return { accessMs, readyMs, workloadId: String(r.workload_id) };
}

/** The qemu processes the agent runs (their argv names its vm root). */
function agentQemus(agent: AgentProcess): Promise<number[]> {
  return findPids((argv) => (argv[0] ?? '').includes('qemu-system') && argv.some((a) => a.includes(agent.vmRoot)));
}

/** Ids of pool VMs the agent's log reports ready and not yet handed off, failed or destroyed. */
export function idlePoolVms(log: string): Set<string> {
  const idle = new Set<string>();
  for (const line of log.split('\n')) {
    if (!line.includes('pool VM') && !line.includes('hand-off')) continue;
    let rec: { msg?: unknown; workloadId?: unknown };
    try {
      rec = JSON.parse(line) as typeof rec;
    } catch {
      continue;
    }
    if (typeof rec.workloadId !== 'string' || typeof rec.msg !== 'string') continue;
    if (rec.msg === 'pool VM ready') idle.add(rec.workloadId);
    else idle.delete(rec.workloadId);
  }
  return idle;
}

/** Wait until WARM_POOL pool VMs are idle and no other qemu of the agent runs. */
async function waitPoolFull(agent: AgentProcess): Promise<void> {
  const end = Date.now() + READY_TIMEOUT_MS;
  for (;;) {
    const idle = idlePoolVms(agent.output());
    if (idle.size >= WARM_POOL && (await agentQemus(agent)).length === WARM_POOL) return;
    if (Date.now() > end) throw new Error(`the warm pool was not full after ${READY_TIMEOUT_MS} ms (${idle.size} idle)`);
    await sleep(500);
  }
}

function cpuTicks(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // utime and stime are fields 14 and 15; the command name before them may hold spaces.
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(f[11]) + Number(f[12]);
}

/** CPU (percent of one core) and RSS of each idle pool VM over a window, as p50 over the VMs. */
async function idleCost(agent: AgentProcess): Promise<{ cpuPct: number; rssMb: number }> {
  const pids = await agentQemus(agent);
  const ticksPerSecond = 100;
  const before = pids.map(cpuTicks);
  await sleep(IDLE_COST_WINDOW_MS);
  const cpu = pids.map((pid, i) => ((cpuTicks(pid) - before[i]!) / ticksPerSecond / (IDLE_COST_WINDOW_MS / 1000)) * 100);
  return { cpuPct: r1(p50(cpu)), rssMb: r1(p50(pids.map((pid) => procStatusKb(pid, 'VmRSS'))) / 1024) };
}

export async function measureWarm(agent: AgentProcess, client: ConsumerClient, samples: number, say: (s: string) => void): Promise<WarmResults> {
  say(`bench: B6 waiting for the warm pool (${WARM_POOL} cloud guests booting under TCG)...`);
  await waitPoolFull(agent);
  const idle = await idleCost(agent);
  say(`bench: B6 an idle pool VM costs ${idle.cpuPct} % of a core and ${idle.rssMb} MB RSS`);
  const pool: ReadySample[] = [];
  const cold: ReadySample[] = [];
  for (let i = 0; i < samples; i++) {
    await waitPoolFull(agent);
    const p = await spawnUntilReady(client, 'pooled');
    pool.push(p);
    await stopOnce(client, p.workloadId);
    await waitPoolFull(agent);
    const c = await spawnUntilReady(client, 'cold');
    cold.push(c);
    await stopOnce(client, c.workloadId);
    say(`bench: B6 #${i + 1}: ready from the pool ${r1(p.readyMs)} ms, cold ${r1(c.readyMs)} ms`);
  }
  const ready = (xs: ReadySample[]) => xs.map((s) => s.readyMs);
  return {
    samples,
    pool_size: WARM_POOL,
    plan: SIZE,
    pool_ready_p50_ms: r1(p50(ready(pool))),
    pool_ready_p95_ms: r1(p95(ready(pool))),
    cold_ready_p50_ms: r1(p50(ready(cold))),
    cold_ready_p95_ms: r1(p95(ready(cold))),
    pool_access_p50_ms: r1(p50(pool.map((s) => s.accessMs))),
    cold_access_p50_ms: r1(p50(cold.map((s) => s.accessMs))),
    speedup_p50: r2(p50(ready(cold)) / p50(ready(pool))),
    pool_samples_ms: ready(pool).map(r1),
    cold_samples_ms: ready(cold).map(r1),
    idle_cpu_pct_per_vm: idle.cpuPct,
    idle_rss_mb_per_vm: idle.rssMb,
    guest: 'cloud (Debian bookworm, cloud-init 22.4, qemu-guest-agent 7.2), TCG',
  };
}
