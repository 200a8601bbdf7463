import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { configJsonSchema, configJsonSchemaText } from '../../src/config/json-schema.js';
import { ConfigError, parseConfig } from '../../src/config/load.js';

const read = (name: string) => readFileSync(new URL(`../../config/${name}`, import.meta.url), 'utf8');
const EXAMPLES = ['provider.example.json', 'provider.direct-kernel.example.json'];

/** Every property path the schema knows, arrays as `[]`. */
function schemaPaths(node: any, prefix: string, out: string[]): string[] {
  if (!node || typeof node !== 'object') return out;
  for (const alt of [...(node.anyOf ?? []), ...(node.oneOf ?? [])]) schemaPaths(alt, prefix, out);
  if (node.properties) {
    for (const [k, v] of Object.entries(node.properties)) {
      const p = prefix ? `${prefix}.${k}` : k;
      out.push(p);
      schemaPaths(v, p, out);
    }
  }
  if (node.items) schemaPaths(node.items, `${prefix}[]`, out);
  return out;
}

function hasPath(obj: any, path: string): boolean {
  const [head, ...rest] = path.split('.');
  const isArray = head!.endsWith('[]');
  const key = isArray ? head!.slice(0, -2) : head!;
  if (obj === null || typeof obj !== 'object' || !(key in obj)) return false;
  if (!rest.length) return true;
  const v = obj[key];
  return isArray ? Array.isArray(v) && v.some((e) => hasPath(e, rest.join('.'))) : hasPath(v, rest.join('.'));
}

describe('config JSON schema', () => {
  it('committed config/provider.schema.json equals a fresh generation (run `npm run gen:schema`)', () => {
    expect(read('provider.schema.json')).toBe(configJsonSchemaText());
  });

  it('the examples together show every field of the schema', () => {
    const examples = EXAMPLES.map((n) => JSON.parse(read(n)));
    const missing = schemaPaths(configJsonSchema(), '', []).filter((p) => !examples.some((e) => hasPath(e, p)));
    expect(missing).toEqual([]);
  });

  it('the examples point at the schema and load ($schema is ignored by the loader)', () => {
    for (const name of EXAMPLES) {
      const raw = JSON.parse(read(name));
      expect(raw.$schema).toBe('./provider.schema.json');
      const cfg = parseConfig(raw, { baseDir: '/etc/paygress-agent', env: {} });
      expect(cfg.drivers.kvm?.baseImage.startsWith('/')).toBe(true);
    }
  });

  it('closes objects so editors flag a misspelt key', () => {
    const s = configJsonSchema() as any;
    expect(s.additionalProperties).toBe(false);
    expect(s.properties.drivers.properties.kvm.additionalProperties).toBe(false);
  });
});

describe('config errors name the field and the expected value', () => {
  const base = () => JSON.parse(read('provider.example.json'));
  const cases: [string, (c: any) => void, RegExp][] = [
    ['a relay that is not a websocket URL', (c) => (c.relays[1] = 'https://nos.lol'), /relays\.1: must be a ws:\/\/ or wss:\/\/ URL/],
    ['a port range upside down', (c) => (c.drivers.kvm.portRange = { from: 43000, to: 42000 }), /drivers\.kvm\.portRange: from must be <= to/],
    ['a port below 1024', (c) => (c.drivers.kvm.portRange.from = 22), /drivers\.kvm\.portRange\.from: .*>=\s*1024/],
    ['a missing public host', (c) => delete c.provider.publicHost, /provider\.publicHost: .*expected string/],
    ['a plan with a string for vcpus', (c) => (c.plans[0].vcpus = '2'), /plans\.0\.vcpus: .*expected number/],
    ['a bad log level', (c) => (c.logLevel = 'loud'), /logLevel: .*"info"/],
    ['a sha256 of the wrong length', (c) => (c.drivers.kvm.baseImageSha256 = 'abc'), /drivers\.kvm\.baseImageSha256: must be 64 hex characters/],
  ];
  for (const [what, mutate, expected] of cases) {
    it(what, () => {
      const cfg = base();
      mutate(cfg);
      let err: unknown;
      try {
        parseConfig(cfg, { baseDir: '/x', source: 'provider.json', env: {} });
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(ConfigError);
      expect((err as Error).message).toMatch(expected);
    });
  }
});
