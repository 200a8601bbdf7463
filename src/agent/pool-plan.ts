/**
 * The warm pool's decisions, pure: what to destroy and what to boot next
 * (`poolStep`), and how long a plan waits after failures (`backoffMs`).
 * warm-pool.ts holds the VMs and does the driver calls.
 */
import type { Plan } from './plans.js';

export interface Size {
  vcpus: number;
  memoryMb: number;
  diskGb: number;
}

export type PoolVmState = 'booting' | 'idle' | 'claimed';

export interface PoolVm extends Size {
  id: string;
  planId: string;
  state: PoolVmState;
}

export function sameSize(a: Size, b: Size): boolean {
  return a.vcpus === b.vcpus && a.memoryMb === b.memoryMb && a.diskGb === b.diskGb;
}

export interface PoolStep {
  /** Idle VMs to destroy: their plan is gone, its size changed, or the plan has more than it wants. */
  surplus: string[];
  /** The plan to boot one more VM for (only when none is booting). */
  boot?: Plan;
}

/** What the pool should do now. Pure. `blockedUntil`: per plan, no boot before this time (ms) after failures. */
export function poolStep(plans: readonly Plan[], vms: readonly PoolVm[], blockedUntil: ReadonlyMap<string, number>, now: number): PoolStep {
  const surplus: string[] = [];
  const counted = new Map<string, PoolVm[]>();
  for (const vm of vms) {
    const plan = plans.find((p) => p.id === vm.planId);
    if (!plan || !sameSize(vm, plan)) {
      // A booting or claimed one is judged again once it is idle (or gone).
      if (vm.state === 'idle') surplus.push(vm.id);
      continue;
    }
    counted.set(plan.id, [...(counted.get(plan.id) ?? []), vm]);
  }
  for (const plan of plans) {
    const mine = counted.get(plan.id) ?? [];
    const excess = mine.length - (plan.warmPool ?? 0);
    if (excess > 0) surplus.push(...mine.filter((vm) => vm.state === 'idle').slice(-excess).map((vm) => vm.id));
  }
  if (vms.some((vm) => vm.state === 'booting')) return { surplus };
  const boot = plans.find((p) => (counted.get(p.id)?.length ?? 0) < (p.warmPool ?? 0) && now >= (blockedUntil.get(p.id) ?? 0));
  return boot ? { surplus, boot } : { surplus };
}

/** Wait before the next boot of a plan after `failures` failures in a row. Pure. */
export function backoffMs(failures: number, baseMs: number, maxMs: number): number {
  return failures <= 0 ? 0 : Math.min(maxMs, baseMs * 2 ** Math.min(failures - 1, 30));
}
