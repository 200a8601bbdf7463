import { describe, expect, it } from 'vitest';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { REDACT_PATHS } from '../../src/util/logger.js';

describe('log redaction', () => {
  it('censors secret fields at the top level and nested two deep', () => {
    let out = '';
    const sink = new Writable({ write: (chunk, _enc, cb) => ((out += chunk.toString()), cb()) });
    const log = pino({ redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, sink);
    log.info({ password: 's1', spec: { rootPassword: 's2', deeper: { root_password: 's3' } }, req: { cashu_token: 's4', content: 's5' } }, 'x');
    for (const s of ['s1', 's2', 's3', 's4', 's5']) expect(out).not.toContain(`"${s}"`);
    expect(out.match(/\[redacted\]/g)).toHaveLength(5);
  });
});
