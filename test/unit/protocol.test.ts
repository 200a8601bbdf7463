import { describe, expect, it } from 'vitest';
import { parseRequest, MAX_CONTENT_BYTES } from '../../src/protocol/requests.js';
import { isValidSshPublicKey } from '../../src/protocol/ssh-key.js';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const PASSWORD = 'correct horse battery staple';

function expectInvalid(content: string): string {
  const r = parseRequest(content);
  expect(r.ok).toBe(false);
  if (r.ok) throw new Error('unreachable');
  expect(r.error.code).toBe('invalid_request');
  return r.error.message;
}

describe('parseRequest', () => {
  it('accepts a minimal spawn and keeps the password exactly', () => {
    const r = parseRequest(JSON.stringify({ type: 'spawn', root_password: PASSWORD }));
    expect(r).toEqual({ ok: true, request: { type: 'spawn', root_password: PASSWORD } });
  });

  it('accepts a full spawn', () => {
    const r = parseRequest(
      JSON.stringify({ type: 'spawn', version: 1, root_password: PASSWORD, plan: 'small', vcpus: 1, memory_mb: 256, disk_gb: 2, isolation: 'dedicated-host', ssh_keys: [] }),
    );
    expect(r.ok).toBe(true);
  });

  it('accepts stop and status with a workload id', () => {
    expect(parseRequest('{"type":"stop","workload_id":"w-0123456789ab"}').ok).toBe(true);
    expect(parseRequest('{"type":"status","workload_id":"w-0123456789ab"}').ok).toBe(true);
  });

  it('refuses malformed JSON, non-objects and unknown types', () => {
    expect(expectInvalid('{"type":')).toMatch(/not valid JSON/);
    expect(expectInvalid('[1,2]')).toMatch(/JSON object/);
    expect(expectInvalid('null')).toMatch(/JSON object/);
    expect(expectInvalid('{"type":"reboot"}')).toMatch(/"type"/);
    expect(expectInvalid('{"type":"__proto__"}')).toMatch(/"type"/);
  });

  it('refuses content over the size cap without parsing it', () => {
    const big = JSON.stringify({ type: 'spawn', root_password: PASSWORD, pad: 'x'.repeat(MAX_CONTENT_BYTES) });
    expect(expectInvalid(big)).toMatch(/larger than 65536 bytes/);
  });

  it('names the bad field and never echoes the value', () => {
    const secret = 'SECRET-VALUE-123';
    const msg = expectInvalid(JSON.stringify({ type: 'spawn', root_password: PASSWORD, vcpus: secret }));
    expect(msg).toMatch(/"vcpus"/);
    expect(msg).not.toContain(secret);
    const msg2 = expectInvalid(JSON.stringify({ type: 'stop', workload_id: `../../${secret}` }));
    expect(msg2).toMatch(/workload_id/);
    expect(msg2).not.toContain(secret);
  });

  it('requires a password of sane length without control characters', () => {
    expect(expectInvalid('{"type":"spawn"}')).toMatch(/root_password/);
    expect(expectInvalid('{"type":"spawn","root_password":"short"}')).toMatch(/at least 12/);
    expect(expectInvalid(JSON.stringify({ type: 'spawn', root_password: 'twelve chars\nand more' }))).toMatch(/control/);
  });

  it('refuses wrong field types', () => {
    expect(expectInvalid(JSON.stringify({ type: 'spawn', root_password: 123456789012345 }))).toMatch(/root_password/);
    expect(expectInvalid(JSON.stringify({ type: 'spawn', root_password: PASSWORD, isolation: 'bare-metal' }))).toMatch(/isolation/);
    expect(expectInvalid(JSON.stringify({ type: 'spawn', root_password: PASSWORD, ssh_keys: 'ssh-ed25519 AAAA' }))).toMatch(/ssh_keys/);
  });
});

describe('isValidSshPublicKey', () => {
  it('accepts a real key made by ssh-keygen and refuses tampered ones', () => {
    const dir = mkdtempSync(join(tmpdir(), 'pga-key-'));
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'me@laptop', '-f', join(dir, 'k')]);
    const line = readFileSync(join(dir, 'k.pub'), 'utf8').trim();
    expect(isValidSshPublicKey(line)).toBe(true);
    const [type, b64] = line.split(' ') as [string, string];
    expect(isValidSshPublicKey(`${type} ${b64}`)).toBe(true);
    expect(isValidSshPublicKey(`ssh-rsa ${b64}`)).toBe(false); // type word disagrees with the blob
    expect(isValidSshPublicKey(`${line}\nssh_pwauth: false`)).toBe(false);
    expect(isValidSshPublicKey(`${type} ${b64.slice(0, -4)}`)).toBe(false);
    expect(isValidSshPublicKey('ssh-ed25519 not-base64!')).toBe(false);
  });
});
