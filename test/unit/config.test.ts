import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { parseConfig, ConfigError } from '../../src/config/load.js';

const example = JSON.parse(readFileSync(new URL('../../config/provider.example.json', import.meta.url), 'utf8'));

describe('config', () => {
  it('accepts the shipped example and resolves relative paths against its folder', () => {
    const cfg = parseConfig(example, { baseDir: '/etc/paygress-agent', env: {} });
    expect(cfg.tiers[0]?.level).toBe('dedicated-host');
    expect(cfg.provider.keyFile.startsWith('/')).toBe(true);
    expect(cfg.drivers.kvm?.accel).toBe('auto');
  });

  it('takes the key file from PAYGRESS_KEY_FILE', () => {
    const cfg = parseConfig(example, { baseDir: '/x', env: { PAYGRESS_KEY_FILE: '/run/secret/nsec' } });
    expect(cfg.provider.keyFile).toBe('/run/secret/nsec');
  });

  it('names the bad field and what it expects', () => {
    const bad = structuredClone(example);
    bad.drivers.kvm.accel = 'fast';
    expect(() => parseConfig(bad, { baseDir: '/x', env: {} })).toThrow(ConfigError);
    expect(() => parseConfig(bad, { baseDir: '/x', env: {} })).toThrow(/drivers\.kvm\.accel.*"auto"\|"kvm"\|"tcg"/s);
  });

  it('checks cross-field rules: default plan exists, tiers have drivers', () => {
    const bad = structuredClone(example);
    bad.defaultPlan = 'nope';
    expect(() => parseConfig(bad, { baseDir: '/x', env: {} })).toThrow(/defaultPlan/);
    const noDriver = structuredClone(example);
    delete noDriver.drivers.kvm;
    expect(() => parseConfig(noDriver, { baseDir: '/x', env: {} })).toThrow(/drivers\.kvm: must be configured/);
  });
});
