import { mkdtempSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { nextStep, PaymentJournal, settle, type PaymentRecord } from '../../src/agent/payment-journal.js';

const base: PaymentRecord = {
  ref: 'a'.repeat(64),
  kind: 'spawn',
  sender: 'b'.repeat(64),
  channel: 'nip17',
  dialect: 'v1',
  workloadId: 'w-0123456789ab',
  mint: 'http://127.0.0.1:1',
  unit: 'sat',
  phase: 'quoted',
  token: 'cashuBtoken',
  createdAt: '2030-01-01T00:00:00.000Z',
};

describe('payment journal decisions', () => {
  it('a swap in doubt is swapped again by ref; a finished swap is settled against the lease', () => {
    expect(nextStep(base)).toBe('redeem_again');
    expect(nextStep({ ...base, phase: 'redeemed', msats: 5000 })).toBe('settle');
  });

  it('a swapped payment whose lease exists keeps the charge and refunds only the surplus', () => {
    const leased = settle({ ...base, phase: 'redeemed', msats: 5000, seconds: 400, refundMsats: 1000 }, true);
    expect(leased).toMatchObject({ phase: 'leased', refundMsats: 1000 });
    expect(nextStep(leased)).toBe('refund');
    expect(nextStep(settle({ ...base, phase: 'redeemed', msats: 4000, seconds: 400, refundMsats: 0 }, true))).toBe('answer');
  });

  it('a swapped payment whose lease never came is refunded in full, with a failure to answer', () => {
    const failed = settle({ ...base, phase: 'redeemed', msats: 5000, seconds: 400, refundMsats: 1000 }, false);
    expect(failed).toMatchObject({ phase: 'failed', refundMsats: 5000, failure: { code: 'spawn_failed' } });
    expect(nextStep(failed)).toBe('refund');
  });

  it('a refund begun is finished; a refund made is answered', () => {
    expect(nextStep({ ...base, phase: 'refunding', msats: 5000, refundMsats: 5000 })).toBe('refund');
    expect(nextStep({ ...base, phase: 'refunded', msats: 5000, refundMsats: 5000, refundToken: 'cashuBrefund' })).toBe('answer');
  });
});

describe('payment journal files', () => {
  it('writes 0600 records, lists them at start, removes them once answered, and keeps unreadable ones', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'pga-payjournal-'));
    const journal = new PaymentJournal(dir);
    await journal.put(base);
    const file = join(dir, 'payments', `${base.ref}.json`);
    expect(statSync(file).mode & 0o777).toBe(0o600);
    writeFileSync(join(dir, 'payments', `${'c'.repeat(64)}.json`), '{"half":');
    const left = journal.leftovers();
    expect(left.records).toEqual([base]);
    expect(left.broken).toHaveLength(1);
    await journal.done(base.ref);
    expect(readdirSync(join(dir, 'payments'))).toEqual([`${'c'.repeat(64)}.json`]);
  });
});
