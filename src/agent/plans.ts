import { RequestError } from '../protocol/errors.js';

export interface Plan {
  id: string;
  name: string;
  description: string;
  vcpus: number;
  memoryMb: number;
  diskGb: number;
  durationSeconds: number;
  /** 0 = free; otherwise what a paid lease costs per second. */
  rateMsatsPerSec?: number;
  /** Idle VMs kept booted for this plan (the warm pool); 0 or absent = none. */
  warmPool?: number;
  /** A full-size spawn that finds the pool empty boots cold (default) or is refused `busy`. */
  whenPoolEmpty?: 'cold' | 'busy';
}

export interface Resources {
  plan: Plan;
  vcpus: number;
  memoryMb: number;
  diskGb: number;
}

/**
 * A spawn names a plan (or gets the default) and may ask for less than the
 * plan's limits, never more.
 */
export function resolveResources(
  plans: readonly Plan[],
  defaultPlan: string,
  req: { plan?: string | undefined; vcpus?: number | undefined; memory_mb?: number | undefined; disk_gb?: number | undefined },
): Resources {
  const id = req.plan ?? defaultPlan;
  const plan = plans.find((p) => p.id === id);
  if (!plan) throw new RequestError('unknown_plan', `plan "${id.slice(0, 32)}" is not offered; offered: ${plans.map((p) => p.id).join(', ')}`);
  const over: string[] = [];
  if (req.vcpus !== undefined && req.vcpus > plan.vcpus) over.push(`vcpus <= ${plan.vcpus}`);
  if (req.memory_mb !== undefined && req.memory_mb > plan.memoryMb) over.push(`memory_mb <= ${plan.memoryMb}`);
  if (req.disk_gb !== undefined && req.disk_gb > plan.diskGb) over.push(`disk_gb <= ${plan.diskGb}`);
  if (over.length) throw new RequestError('exceeds_plan', `plan ${plan.id} allows ${over.join(', ')}`);
  return {
    plan,
    vcpus: req.vcpus ?? plan.vcpus,
    memoryMb: req.memory_mb ?? plan.memoryMb,
    diskGb: req.disk_gb ?? plan.diskGb,
  };
}
