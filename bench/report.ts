/** The bench's table: one row per measure, beside its baseline and target, from a results record. */
import type { BenchResults, MachineInfo, WarmResults } from './results.js';
import { r1 } from './stats.js';

export function table(r: BenchResults): string {
  const m = r.machine;
  const b1 = r.b1_spawn;
  const ph = b1.phases_ms;
  const rows: Row[] = [
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
    ...(r.b6_warm ? warmRows(r.b6_warm) : []),
  ];
  return render(m, `Load average before/after: ${r.load_average.before.join(' ')} / ${r.load_average.after.join(' ')}; run ${r.started_at}`, rows);
}

type Row = [string, string, string, string, string];

function warmRows(w: WarmResults): Row[] {
  return [
    [`B6 DM → ready, warm pool of ${w.pool_size} (p50 / p95, ${w.samples} samples)`, `${w.pool_ready_p50_ms} / ${w.pool_ready_p95_ms} ms`, `cold ${w.cold_ready_p50_ms} / ${w.cold_ready_p95_ms} ms`, `${w.speedup_p50}× faster`, 'pool p50 ≤ 1.5 s'],
    ['  B6 DM → access details p50', `${w.pool_access_p50_ms} ms`, `cold ${w.cold_access_p50_ms} ms`, '', ''],
    [`  B6 an idle pool VM (${w.plan.vcpus} vCPU, ${w.plan.memoryMb} MB)`, `${w.idle_cpu_pct_per_vm} % of a core, ${w.idle_rss_mb_per_vm} MB RSS`, '', '', ''],
  ];
}

/** B6 alone (BENCH_ONLY=warm). */
export function warmTable(w: WarmResults, m: MachineInfo): string {
  return render(m, `guest: ${w.guest}`, warmRows(w));
}

function render(m: MachineInfo, subtitle: string, rows: Row[]): string {
  const head = ['measure', 'agent', 'baseline', 'ratio', 'target'];
  return [
    `Machine: ${m.cpu}, ${m.cores} cores, ${m.memory_gb} GB, ${m.os}, kernel ${m.kernel}, Node ${m.node}, ${m.qemu}, ${m.accel}`,
    subtitle,
    '',
    `| ${head.join(' | ')} |`,
    `| ${head.map(() => '---').join(' | ')} |`,
    ...rows.map((row) => `| ${row.join(' | ')} |`),
  ].join('\n');
}
