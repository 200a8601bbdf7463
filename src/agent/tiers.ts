import { isolationRank, meetsIsolation, type IsolationLevel } from '../protocol/isolation.js';

export interface TierOffer {
  level: IsolationLevel;
  driver: string;
}

/**
 * The least isolated offered tier that still meets the requested minimum:
 * the consumer gets what they asked for without the provider spending a more
 * expensive tier on them. Undefined when nothing offered is good enough.
 */
export function chooseTier(offered: readonly TierOffer[], minimum: IsolationLevel): TierOffer | undefined {
  return offered
    .filter((t) => meetsIsolation(t.level, minimum))
    .sort((a, b) => isolationRank(a.level) - isolationRank(b.level))[0];
}
