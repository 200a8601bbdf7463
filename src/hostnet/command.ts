/**
 * `paygress-agent net up|down|status`: the install-time setup's face, run as
 * root by systemd/paygress-agent-net.service before the agent starts.
 */
import type { KvmConfig } from '../config/schema.js';
import { tapNetworkOf } from '../drivers/kvm/config.js';
import { netStatusRows } from './checks.js';
import { netDown, netUp } from './setup.js';

export const NET_ACTIONS = ['up', 'down', 'status'] as const;
export type NetAction = (typeof NET_ACTIONS)[number];

export function isNetAction(text: string | undefined): text is NetAction {
  return (NET_ACTIONS as readonly string[]).includes(text ?? '');
}

/** Exit code: 0 done / all fine, 1 a status problem, 78 when the config has no tap network. */
export async function runNetCommand(action: NetAction, kvm: KvmConfig | undefined, out: (line: string) => void): Promise<number> {
  if (!kvm || kvm.network !== 'tap') {
    out('drivers.kvm.network is not "tap": nothing to set up');
    return action === 'status' ? 78 : 0;
  }
  const plan = tapNetworkOf(kvm);
  if (action === 'up') await netUp(plan, out);
  if (action === 'down') await netDown(plan, out);
  if (action !== 'status') return 0;
  const rows = await netStatusRows(plan);
  for (const r of rows) out(`${r.status.padEnd(5)} ${r.name.padEnd(16)} ${r.detail}${r.fix ? `\n      fix: ${r.fix}` : ''}`);
  return rows.some((r) => r.status !== 'ok') ? 1 : 0;
}
