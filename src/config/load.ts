/**
 * Reading the config file: JSON → env overrides → relative paths resolved
 * against the file's folder → schema. Every failure names the field.
 */
import { readFileSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import type { z } from 'zod';
import { ConfigSchema, type Config } from './schema.js';

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

export function formatConfigError(source: string, issues: readonly z.core.$ZodIssue[]): string {
  const lines = issues.map((i) => `  - ${i.path.map(String).join('.') || '(root)'}: ${i.message}`);
  return `invalid config ${source}:\n${lines.join('\n')}`;
}

/** Validate an already-parsed config object; `baseDir` anchors relative paths. */
export function parseConfig(raw: unknown, opts: { baseDir: string; source?: string; env?: NodeJS.ProcessEnv }): Config {
  const env = opts.env ?? process.env;
  const withEnv = structuredClone(raw) as Record<string, any>;
  if (env.PAYGRESS_KEY_FILE && withEnv && typeof withEnv === 'object') {
    withEnv.provider = { ...(withEnv.provider ?? {}), keyFile: env.PAYGRESS_KEY_FILE };
  }
  const parsed = ConfigSchema.safeParse(withEnv);
  if (!parsed.success) throw new ConfigError(formatConfigError(opts.source ?? '(inline)', parsed.error.issues));
  return resolvePaths(parsed.data, opts.baseDir);
}

export function loadConfig(path: string, env: NodeJS.ProcessEnv = process.env): Config {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new ConfigError(`cannot read config ${path}: ${(err as Error).message}`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`config ${path} is not valid JSON: ${(err as Error).message}`);
  }
  return parseConfig(raw, { baseDir: dirname(resolve(path)), source: path, env });
}

function resolvePaths(cfg: Config, baseDir: string): Config {
  const abs = (p: string) => (isAbsolute(p) ? p : resolve(baseDir, p));
  const out: Config = { ...cfg, provider: { ...cfg.provider, keyFile: abs(cfg.provider.keyFile) }, stateDir: abs(cfg.stateDir) };
  const kvm = cfg.drivers.kvm;
  if (kvm) {
    out.drivers = {
      ...cfg.drivers,
      kvm: {
        ...kvm,
        vmRoot: abs(kvm.vmRoot),
        overlayTemplateDir: abs(kvm.overlayTemplateDir),
        baseImage: abs(kvm.baseImage),
        ...(kvm.kernel ? { kernel: abs(kvm.kernel) } : {}),
        ...(kvm.initrd ? { initrd: abs(kvm.initrd) } : {}),
      },
    };
  }
  return out;
}
