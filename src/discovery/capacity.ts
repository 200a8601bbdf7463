/**
 * Free capacity advertised in heartbeats: what the host has minus what leases
 * hold. Leases count at their full size (a TCG/KVM guest touches its RAM and
 * its overlay grows lazily, but both may grow to the plan's size at any time),
 * so the numbers say what a new workload can safely be promised.
 */
import { statfs } from 'node:fs/promises';
import { cpus, totalmem } from 'node:os';
import { dirname } from 'node:path';
import type { Capacity } from './events.js';

export interface HostResources {
  cpuCount: number;
  memoryMb: number;
  /** Free disk (for unprivileged users) where VM overlays live. */
  diskFreeGb: number;
}

export interface HeldResources {
  vcpus: number;
  memoryMb: number;
  diskGb: number;
  /** Held by a VM of the agent's own (the warm pool) that any spawn can have: free to a consumer, so not subtracted. */
  evictable?: boolean;
}

/** Pure: host minus what is held for good, never below zero. CPU in millicores as upstream. */
export function freeCapacity(host: HostResources, held: readonly HeldResources[]): Capacity {
  const sum = (f: (h: HeldResources) => number) => held.reduce((n, h) => n + (h.evictable ? 0 : f(h)), 0);
  return {
    cpu_available: Math.max(0, host.cpuCount * 1000 - sum((h) => h.vcpus) * 1000),
    memory_mb_available: Math.max(0, host.memoryMb - sum((h) => h.memoryMb)),
    storage_gb_available: Math.max(0, host.diskFreeGb - sum((h) => h.diskGb)),
  };
}

/** Read the host's numbers. The VM root may not exist yet: its nearest existing ancestor is on the same disk. */
export async function readHostResources(vmRoot: string): Promise<HostResources> {
  let dir = vmRoot;
  let diskFreeGb = 0;
  for (;;) {
    try {
      const st = await statfs(dir);
      diskFreeGb = Math.floor((Number(st.bavail) * Number(st.bsize)) / 1024 ** 3);
      break;
    } catch (err) {
      const parent = dirname(dir);
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || parent === dir) break;
      dir = parent;
    }
  }
  return { cpuCount: cpus().length, memoryMb: Math.floor(totalmem() / 1024 ** 2), diskFreeGb };
}
