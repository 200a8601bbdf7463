import { describe, expect, it } from 'vitest';
import { extendedExpiry, leaseTerms, minimumMsats, topupCapSeconds } from '../../src/agent/pricing.js';

const policy = { minimumSeconds: 60, maxLeaseSeconds: 3600 };

describe('what a payment buys', () => {
  it('buys floor(msats / rate) seconds and charges exactly those; the rest is refunded', () => {
    expect(leaseTerms(10_005, 10, 3600, policy)).toEqual({ ok: true, seconds: 1000, chargedMsats: 10_000, refundMsats: 5 });
  });

  it('caps the lease and refunds what the cap does not use', () => {
    expect(leaseTerms(100_000, 10, 3600, policy)).toEqual({ ok: true, seconds: 3600, chargedMsats: 36_000, refundMsats: 64_000 });
  });

  it('refuses less than the minimum duration, naming what it would take', () => {
    expect(minimumMsats(10, policy)).toBe(600);
    expect(leaseTerms(599, 10, 3600, policy)).toEqual({ ok: false, reason: 'insufficient_payment', neededMsats: 600 });
    expect(leaseTerms(600, 10, 3600, policy)).toMatchObject({ ok: true, seconds: 60, refundMsats: 0 });
  });

  it('refuses a top-up when the lease has no room for the minimum left', () => {
    expect(topupCapSeconds(3590, policy)).toBe(10);
    expect(leaseTerms(1_000_000, 10, topupCapSeconds(3590, policy), policy)).toMatchObject({ ok: false, reason: 'at_maximum' });
    expect(topupCapSeconds(-5, policy)).toBe(3600);
  });

  it('has no terms for a free plan (rate 0): no division by zero, callers take nothing', () => {
    expect(() => leaseTerms(1000, 0, 3600, policy)).toThrow(RangeError);
  });

  it('refunds whole units only; what is left below one sat buys seconds rather than staying with the provider', () => {
    // 400 sat at 100 msat/s with room for 3001 s: 99.9 sat over the cap → 99 sat back, 0.9 sat = 9 s more.
    expect(leaseTerms(400_000, 100, 3001, policy, 1000)).toEqual({ ok: true, seconds: 3010, chargedMsats: 301_000, refundMsats: 99_000 });
    // Less than one second's price cannot become time: at most that is kept.
    const t = leaseTerms(400_050, 100, 3001, policy, 1000);
    expect(t).toMatchObject({ ok: true, seconds: 3010, refundMsats: 99_000 });
    if (t.ok) expect(400_050 - t.chargedMsats - t.refundMsats).toBeLessThan(100);
  });

  it('never refunds more than was paid nor charges more than was paid, whatever the numbers', () => {
    for (let paid = 0; paid < 5000; paid += 37) {
      for (const rate of [1, 3, 7, 10, 1000]) {
        const t = leaseTerms(paid, rate, 3600, policy);
        if (!t.ok) continue;
        expect(t.chargedMsats + t.refundMsats).toBe(paid);
        const inSats = leaseTerms(paid, rate, 3600, policy, 1000);
        if (!inSats.ok) continue;
        expect(inSats.refundMsats % 1000).toBe(0);
        const kept = paid - inSats.chargedMsats - inSats.refundMsats;
        expect(kept).toBeGreaterThanOrEqual(0);
        expect(kept).toBeLessThan(rate);
        expect(t.chargedMsats).toBe(t.seconds * rate);
        expect(t.seconds).toBeLessThanOrEqual(3600);
      }
    }
  });

  it('extends from the current expiry, not from now', () => {
    const now = Date.parse('2030-01-01T00:00:00Z');
    expect(extendedExpiry('2030-01-01T00:10:00.000Z', 600, now)).toBe('2030-01-01T00:20:00.000Z');
  });
});
