import { describe, expect, it } from 'vitest';
import { idlePoolVms } from '../../bench/warm.js';

const line = (msg: string, workloadId?: string) => JSON.stringify({ level: 30, msg, ...(workloadId ? { workloadId } : {}) });

describe('bench B6: idle pool VMs from the agent log', () => {
  it('counts VMs reported ready until they are handed off, fail or go', () => {
    const log = [
      line('pool VM booting', 'w-a'),
      line('pool VM ready', 'w-a'),
      line('pool VM booting', 'w-b'),
      line('pool VM ready', 'w-b'),
      'not json at all',
      line('pool VM ready'),
      line('pool VM ready', 'w-c'),
      line('pool VM handed off', 'w-a'),
      line('hand-off failed; the VM is destroyed', 'w-c'),
    ].join('\n');
    expect([...idlePoolVms(log)]).toEqual(['w-b']);
  });

  it('sees a VM that died while idle leave the pool', () => {
    const log = [line('pool VM ready', 'w-a'), line('pool VM died while idle; replaced', 'w-a')].join('\n');
    expect(idlePoolVms(log).size).toBe(0);
  });
});
