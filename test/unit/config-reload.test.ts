import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { parseConfig } from '../../src/config/load.js';
import { applyLiveFields, changedPaths, planReload } from '../../src/config/reload.js';

const example = JSON.parse(readFileSync(new URL('../../config/provider.example.json', import.meta.url), 'utf8'));
const parse = (raw: unknown) => parseConfig(raw, { baseDir: '/etc/paygress-agent', env: {} });

describe('config reload: what changed, what applies live', () => {
  it('an identical file changes nothing', () => {
    expect(planReload(parse(example), parse(structuredClone(example)))).toEqual({ live: [], needsRestart: [] });
  });

  it('plans, limits, relays and the log level apply live', () => {
    const next = structuredClone(example);
    next.relays = [...next.relays, 'wss://another.example'];
    next.logLevel = 'debug';
    next.plans[0].memoryMb = 4096;
    next.limits = { ...(next.limits ?? {}), maxVms: 3 };
    const plan = planReload(parse(example), parse(next));
    expect(plan.needsRestart).toEqual([]);
    expect(plan.live.sort()).toEqual(['limits.maxVms', 'logLevel', 'plans', 'relays']);
  });

  it('who may spawn applies live (allowlist keys, mode, paid-lease bounds); the wallet config needs a restart', () => {
    const next = structuredClone(example);
    next.admission = { ...next.admission, mode: 'allowlist', allowlist: ['a'.repeat(64)], maxLeaseSeconds: 3600 };
    next.payment = { ...next.payment, mintTimeoutMs: 20_000 };
    const plan = planReload(parse(example), parse(next));
    expect(plan.live.sort()).toEqual(['admission.allowlist', 'admission.maxLeaseSeconds', 'admission.mode']);
    expect(plan.needsRestart).toEqual(['payment.mintTimeoutMs']);
    expect(applyLiveFields(parse(example), parse(next)).admission.allowlist).toEqual(['a'.repeat(64)]);
  });

  it('fields naming what the agent holds (state dir, key, VM root, qemu) need a restart', () => {
    const next = structuredClone(example);
    next.stateDir = '/srv/elsewhere';
    next.provider.keyFile = '/etc/paygress-agent/other.nsec';
    next.drivers.kvm.vmRoot = '/srv/vms';
    next.drivers.kvm.accel = 'tcg';
    next.limits = { ...(next.limits ?? {}), rateBurst: 3 };
    const plan = planReload(parse(example), parse(next));
    expect(plan.live).toEqual(['limits.rateBurst']);
    expect(plan.needsRestart.sort()).toEqual(['drivers.kvm.accel', 'drivers.kvm.vmRoot', 'provider.keyFile', 'stateDir']);
  });

  it('the config after a reload takes only the live fields from the new file', () => {
    const running = parse(example);
    const next = structuredClone(example);
    next.stateDir = '/srv/elsewhere';
    next.logLevel = 'warn';
    const after = applyLiveFields(running, parse(next));
    expect(after.stateDir).toBe(running.stateDir);
    expect(after.logLevel).toBe('warn');
    expect(planReload(after, parse(next)).live).toEqual([]);
  });

  it('changedPaths treats arrays as one value and one-sided fields as changes', () => {
    expect(changedPaths({ a: [1, 2], b: { c: 1 } }, { a: [1, 2], b: { c: 1 } })).toEqual([]);
    expect(changedPaths({ a: [1, 2] }, { a: [2, 1] })).toEqual(['a']);
    expect(changedPaths({ b: { c: 1 } }, { b: { c: 1, d: 2 } })).toEqual(['b.d']);
    expect(changedPaths({ b: { c: 1 } }, {})).toEqual(['b']);
  });
});
