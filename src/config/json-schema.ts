/**
 * The config file's JSON Schema, generated from the zod schema so editors can
 * complete and check provider.json. `config/provider.schema.json` is this,
 * committed; `npm run gen:schema` rewrites it and a unit test keeps the two equal.
 */
import { z } from 'zod';
import { ConfigSchema } from './schema.js';

export function configJsonSchema(): Record<string, unknown> {
  // `input`: what a person writes, so fields with defaults are optional.
  const schema = z.toJSONSchema(ConfigSchema, { io: 'input', unrepresentable: 'any', target: 'draft-2020-12' }) as Record<string, any>;
  schema.title = 'paygress-agent provider config';
  // The loader ignores `$schema`; let editors accept the pointer to this file.
  schema.properties = { $schema: { type: 'string', description: 'Path or URL of this JSON schema (for editors); ignored by the agent.' }, ...schema.properties };
  closeObjects(schema);
  return schema;
}

/** Editors flag a misspelt key only when objects say no other keys are allowed. */
function closeObjects(node: unknown): void {
  if (Array.isArray(node)) return node.forEach(closeObjects);
  if (typeof node !== 'object' || node === null) return;
  const n = node as Record<string, unknown>;
  if (n.type === 'object' && typeof n.properties === 'object' && n.additionalProperties === undefined) n.additionalProperties = false;
  for (const v of Object.values(n)) closeObjects(v);
}

export function configJsonSchemaText(): string {
  return `${JSON.stringify(configJsonSchema(), null, 2)}\n`;
}
