/**
 * Isolation tiers, least to most isolated. A tier "meets" a requested minimum
 * when its rank is at least the minimum's rank.
 */
export const ISOLATION_LEVELS = ['shared-kernel', 'dedicated-host', 'attested-research-tier'] as const;
export type IsolationLevel = (typeof ISOLATION_LEVELS)[number];

export function isolationRank(level: IsolationLevel): number {
  return ISOLATION_LEVELS.indexOf(level);
}

export function meetsIsolation(offered: IsolationLevel, minimum: IsolationLevel): boolean {
  return isolationRank(offered) >= isolationRank(minimum);
}
