/** Order statistics and rounding for the bench's results. Pure. */

export function quantile(xs: readonly number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  // Nearest rank: a value that was really observed.
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
}
export const p50 = (xs: readonly number[]): number => quantile(xs, 0.5);
export const p95 = (xs: readonly number[]): number => quantile(xs, 0.95);
export const r1 = (x: number): number => Math.round(x * 10) / 10;
export const r2 = (x: number): number => Math.round(x * 100) / 100;

export interface Spread {
  p50: number;
  p95: number;
}

/** p50 and p95, rounded to 0.1. */
export function spread(xs: readonly number[]): Spread {
  return { p50: r1(p50(xs)), p95: r1(p95(xs)) };
}
