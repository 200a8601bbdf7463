import { describe, expect, it } from 'vitest';
import { chooseTier } from '../../src/agent/tiers.js';
import { resolveResources, type Plan } from '../../src/agent/plans.js';
import { RequestError } from '../../src/protocol/errors.js';

describe('chooseTier', () => {
  const kvm = { level: 'dedicated-host', driver: 'kvm' } as const;
  const shared = { level: 'shared-kernel', driver: 'container' } as const;
  const attested = { level: 'attested-research-tier', driver: 'snp' } as const;

  it('picks the least isolated tier that meets the minimum', () => {
    expect(chooseTier([attested, kvm, shared], 'shared-kernel')).toBe(shared);
    expect(chooseTier([attested, kvm, shared], 'dedicated-host')).toBe(kvm);
    expect(chooseTier([attested, kvm], 'shared-kernel')).toBe(kvm);
  });

  it('returns nothing when no offered tier is good enough', () => {
    expect(chooseTier([kvm, shared], 'attested-research-tier')).toBeUndefined();
    expect(chooseTier([], 'shared-kernel')).toBeUndefined();
  });
});

describe('resolveResources', () => {
  const plans: Plan[] = [
    { id: 'small', name: 'Small', description: '', vcpus: 1, memoryMb: 512, diskGb: 4, durationSeconds: 60 },
    { id: 'big', name: 'Big', description: '', vcpus: 2, memoryMb: 2048, diskGb: 20, durationSeconds: 60 },
  ];

  it('uses the default plan and its limits when nothing is asked', () => {
    expect(resolveResources(plans, 'small', {})).toMatchObject({ plan: plans[0], vcpus: 1, memoryMb: 512, diskGb: 4 });
  });

  it('lets a request take less than the plan', () => {
    expect(resolveResources(plans, 'small', { plan: 'big', memory_mb: 1024 })).toMatchObject({ vcpus: 2, memoryMb: 1024, diskGb: 20 });
  });

  it('refuses more than the plan and unknown plans with their codes', () => {
    const over = () => resolveResources(plans, 'small', { vcpus: 2 });
    expect(over).toThrow(RequestError);
    expect(over).toThrow(/vcpus <= 1/);
    try {
      resolveResources(plans, 'small', { plan: 'huge' });
    } catch (e) {
      expect((e as RequestError).code).toBe('unknown_plan');
    }
    expect.assertions(3);
  });
});
