/**
 * `npm run gen:schema`: write config/provider.schema.json from the zod config
 * schema. Run it after changing src/config/schema.ts (a unit test fails until you do).
 */
import { writeFileSync } from 'node:fs';
import { configJsonSchemaText } from '../src/config/json-schema.js';

const out = new URL('../config/provider.schema.json', import.meta.url);
writeFileSync(out, configJsonSchemaText());
console.log(`wrote ${out.pathname}`);
