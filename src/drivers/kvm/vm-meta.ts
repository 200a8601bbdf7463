/**
 * vm.json: what the driver records about a workload when it launches it,
 * enough to find, probe and stop it later (after an agent restart too).
 * No secrets.
 */
import { readFile, rename, writeFile } from 'node:fs/promises';
import { vmFile } from './workload-files.js';

export interface VmMeta {
  id: string;
  name: string;
  uuid: string;
  sshPort: number;
  /** Tap network slot (src/hostnet/plan.ts), in `tap` mode. */
  slot?: number;
  createdAt: string;
  /** Appears in cloud-init's final message on the serial console. Not a secret. */
  readyToken: string;
  /** Warm-pool VMs only (warm-pool.ts): `idle` until a hand-off starts, then `handed-off`. */
  warm?: WarmState;
}

/** A warm-pool VM's state in vm.json: absent on cold VMs. */
type WarmState = 'idle' | 'handed-off';

/** Written whole or not at all (a rename): a hand-off rewrites it on a running VM. */
export async function writeVmMeta(dir: string, meta: VmMeta): Promise<void> {
  const file = vmFile(dir, 'meta');
  await writeFile(`${file}.tmp`, `${JSON.stringify(meta, null, 2)}\n`, { mode: 0o600 });
  await rename(`${file}.tmp`, file);
}

/** The workload's metadata, or undefined when missing or unreadable. */
export async function readVmMeta(dir: string): Promise<VmMeta | undefined> {
  try {
    const m = JSON.parse(await readFile(vmFile(dir, 'meta'), 'utf8')) as VmMeta;
    return typeof m.sshPort === 'number' && typeof m.name === 'string' ? m : undefined;
  } catch {
    return undefined;
  }
}
