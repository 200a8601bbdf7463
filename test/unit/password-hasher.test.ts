/**
 * LibcryptHasher against the real perl and libcrypt: the same hashes as the
 * in-process sha512crypt, the password never in the helper's argv or
 * environment, and a correct hash whatever happens to the helper.
 */
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { inProcessHasher, LibcryptHasher } from '../../src/util/password-hasher.js';
import { sha512crypt } from '../../src/util/sha512crypt.js';

const hashers: LibcryptHasher[] = [];
function hasher(opts: ConstructorParameters<typeof LibcryptHasher>[0] = {}): LibcryptHasher {
  const h = new LibcryptHasher(opts);
  hashers.push(h);
  return h;
}
afterEach(() => {
  for (const h of hashers.splice(0)) h.close();
});

/** The salt a `$6$salt$hash` was made with, and the in-process hash for it. */
function expected(password: string, hash: string): string {
  const salt = hash.split('$')[2]!;
  return sha512crypt(password, salt);
}

function helperPid(h: LibcryptHasher): number | undefined {
  return (h as unknown as { helper?: { pid?: number } }).helper?.pid;
}

const PASSWORDS = [
  'correct horse battery staple',
  `it's "quoted" \\ and #commented: yes`,
  'pässwörd-ünïcödé-密码-🔑🔑',
  'x'.repeat(256),
  '$6$looks-like$a-hash',
];

describe('LibcryptHasher', () => {
  it('gives the in-process hash, byte for byte, with a fresh 16-character salt each time', async () => {
    const h = hasher();
    for (const pw of PASSWORDS) {
      const got = await h.hash(pw);
      expect(got).toMatch(/^\$6\$[./0-9A-Za-z]{16}\$[./0-9A-Za-z]{86}$/);
      expect(got).toBe(expected(pw, got));
      expect(got).not.toContain(pw);
    }
    const a = await h.hash(PASSWORDS[0]!);
    const b = await h.hash(PASSWORDS[0]!);
    expect(a).not.toBe(b);
  });

  it('runs the hashes in one perl process that never sees the password in argv or env', async () => {
    const h = hasher();
    const pw = 'Argv-Env-Canary-Passw0rd';
    await h.hash(pw);
    const pid = helperPid(h);
    expect(pid).toBeTypeOf('number');
    const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    expect(cmdline.split('\0')[0]).toBe('perl');
    const hex = Buffer.from(pw).toString('hex');
    for (const f of ['cmdline', 'environ']) {
      const text = readFileSync(`/proc/${pid}/${f}`, 'utf8');
      expect(text).not.toContain(pw);
      expect(text).not.toContain(hex);
    }
    await h.hash('another-password-here');
    expect(helperPid(h)).toBe(pid);
  });

  it('answers many hashes at once, each to its own caller', async () => {
    const h = hasher();
    const pws = Array.from({ length: 12 }, (_, i) => `parallel-password-${i}-${'y'.repeat(i)}`);
    const got = await Promise.all(pws.map((pw) => h.hash(pw)));
    got.forEach((hash, i) => expect(hash).toBe(expected(pws[i]!, hash)));
  });

  it('starts a new helper when the old one was killed', async () => {
    const h = hasher();
    await h.hash('first-password-xyz');
    const pid = helperPid(h)!;
    process.kill(pid, 'SIGKILL');
    await new Promise((r) => setTimeout(r, 100));
    const pw = 'after-the-kill-password';
    const got = await h.hash(pw);
    expect(got).toBe(expected(pw, got));
    expect(helperPid(h)).not.toBe(pid);
  });

  it('hashes in-process when perl is missing', async () => {
    const h = hasher({ perl: '/nonexistent/perl' });
    const pw = 'no-perl-here-password';
    const got = await h.hash(pw);
    expect(got).toBe(expected(pw, got));
    expect(helperPid(h)).toBeUndefined();
  });

  it('hashes in-process when the helper answers nonsense (it fails the self-test)', async () => {
    // cat echoes each request line back: the right id, a wrong "hash".
    const h = hasher({ perl: 'cat' });
    const pw = 'echoed-back-password';
    const got = await h.hash(pw);
    expect(got).toBe(expected(pw, got));
    expect(helperPid(h)).toBeUndefined();
  });

  it('after close, still hashes (in-process) and leaves no helper', async () => {
    const h = hasher();
    await h.hash('before-close-password');
    h.close();
    const pw = 'after-close-password';
    const got = await h.hash(pw);
    expect(got).toBe(expected(pw, got));
    expect(helperPid(h)).toBeUndefined();
  });
});

describe('inProcessHasher', () => {
  it('is sha512crypt with a fresh salt', async () => {
    const got = await inProcessHasher.hash('in-process-password');
    expect(got).toBe(expected('in-process-password', got));
  });
});
