/**
 * What a config reload (SIGHUP, `systemctl reload`) may change while the
 * agent runs. Pure: compares the running config with the newly read one and
 * says which changed fields apply live and which need a restart.
 *
 * Live: relays (connections are added and dropped), logLevel, plans and
 * defaultPlan (the next spawn uses them), limits (the next request sees them),
 * admission (who may spawn and the paid-lease bounds: the next spawn or top-up).
 * Everything else names a resource the running agent already holds (its key,
 * its state and VM folders, the driver's qemu settings, timers) and is kept
 * until a restart.
 */
import type { Config } from './schema.js';

/** Top-level fields a reload applies; changes below them apply too. */
export const LIVE_FIELDS = ['relays', 'logLevel', 'plans', 'defaultPlan', 'limits', 'admission'] as const;
export type LiveField = (typeof LIVE_FIELDS)[number];

export interface ReloadPlan {
  /** Changed field paths (dotted) that take effect now. */
  live: string[];
  /** Changed field paths that are kept as they are until a restart. */
  needsRestart: string[];
}

/**
 * Dotted paths of the leaves that differ between two JSON-like values.
 * Arrays compare as one value (a changed relay list or plan list is one
 * change); a field present on one side only is a change.
 */
export function changedPaths(a: unknown, b: unknown, prefix = ''): string[] {
  if (isRecord(a) && isRecord(b)) {
    const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])].sort();
    return keys.flatMap((k) => changedPaths(a[k], b[k], prefix ? `${prefix}.${k}` : k));
  }
  return sameJson(a, b) ? [] : [prefix || '(root)'];
}

export function planReload(running: Config, next: Config): ReloadPlan {
  const plan: ReloadPlan = { live: [], needsRestart: [] };
  for (const path of changedPaths(running, next)) {
    const top = path.split('.')[0] as string;
    (LIVE_FIELDS.includes(top as LiveField) ? plan.live : plan.needsRestart).push(path);
  }
  return plan;
}

/** The config to run with after a reload: the live fields from `next`, everything else from `running`. */
export function applyLiveFields(running: Config, next: Config): Config {
  return { ...running, ...Object.fromEntries(LIVE_FIELDS.map((field) => [field, next[field]])) };
}

function isRecord(x: unknown): x is Record<string, unknown> {
  return typeof x === 'object' && x !== null && !Array.isArray(x);
}

function sameJson(a: unknown, b: unknown): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}
