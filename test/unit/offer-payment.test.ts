import { describe, expect, it } from 'vitest';
import { offerContent, type OfferFacts } from '../../src/discovery/events.js';

const facts: OfferFacts = {
  pubkey: 'a'.repeat(64), name: 'p', location: '', capabilities: ['vm'], isolationLevels: ['dedicated-host'],
  plans: [
    { id: 'small', name: 'Small', description: '', vcpus: 1, memoryMb: 1024, rateMsatsPerSec: 10 },
    { id: 'free', name: 'Free', description: '', vcpus: 1, memoryMb: 512, rateMsatsPerSec: 0 },
  ],
  totalJobsCompleted: 0,
};

describe('the offer of a paid provider', () => {
  it('lists the mints it takes tokens from and each plan rate', () => {
    const offer = offerContent({ ...facts, whitelistedMints: ['https://mint.example/Bitcoin'] });
    expect(offer.whitelisted_mints).toEqual(['https://mint.example/Bitcoin']);
    expect(offer.specs.map((s) => [s.id, s.rate_msats_per_sec])).toEqual([['small', 10], ['free', 0]]);
  });

  it('lists no mint when it takes no payment', () => {
    expect(offerContent(facts).whitelisted_mints).toEqual([]);
  });
});
