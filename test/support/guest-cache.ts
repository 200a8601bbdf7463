/**
 * What the test guests (tiny-guest.ts, cloud-guest.ts) share: where the build
 * scripts cache them, and "build once if any output is missing".
 */
import { statSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

/** scripts/build-<name>-guest.sh */
export function guestBuildScript(name: 'tiny' | 'cloud'): string {
  return join(REPO_ROOT, 'scripts', `build-${name}-guest.sh`);
}

/** The guest's folder; the same rule as the build scripts (PAYGRESS_CACHE_DIR or ~/.cache/paygress-agent). */
export function guestDir(name: 'tiny' | 'cloud', env: NodeJS.ProcessEnv = process.env): string {
  const cache = env.PAYGRESS_CACHE_DIR || join(env.HOME || homedir(), '.cache', 'paygress-agent');
  return join(cache, 'guests', name);
}

export function nonEmptyFile(path: string): boolean {
  try {
    return statSync(path).size > 0;
  } catch {
    return false;
  }
}

/**
 * The guest's paths, running its build script first when `built` says an
 * output is missing; the script's progress goes to our stderr so a slow first
 * build is visibly not a hang.
 */
export async function ensureGuest<P extends { dir: string }>(opts: {
  script: string;
  paths: () => P;
  built: (paths: P) => boolean;
  timeoutMs: number;
}): Promise<P> {
  const before = opts.paths();
  if (opts.built(before)) return before;
  await execa('bash', [opts.script], { stdin: 'ignore', stdout: 'ignore', stderr: 'inherit', timeout: opts.timeoutMs });
  const after = opts.paths();
  if (!opts.built(after)) throw new Error(`${opts.script} finished but outputs are missing in ${after.dir}`);
  return after;
}
