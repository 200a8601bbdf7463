import { execFileSync } from 'node:child_process';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { hashPassword, randomSalt, sha512crypt } from '../../src/util/sha512crypt.js';

// The SHA-512 test vectors from Ulrich Drepper's sha-crypt.txt.
const VECTORS: Array<[key: string, salt: string, rounds: number | undefined, expected: string]> = [
  ['Hello world!', 'saltstring', undefined,
    '$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1'],
  ['Hello world!', 'saltstringsaltstring', 10000,
    '$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.'],
  ['This is just a test', 'toolongsaltstring', 5000,
    '$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUhx1yxdYcz/e1JSbq3y6JMxxl8audkUEm0'],
  ['a very much longer text to encrypt.  This one even stretches over morethan one line.', 'anotherlongsaltstring', 1400,
    '$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3CmLs66x9t0oSwbtEW7o7UmJEiDwGqd8p4ur1'],
  ['we have a short salt string but not a short password', 'short', 77777,
    '$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0gge1a1x3yRULJ5CCaUeOxFmtlcGZelFl5CxtgfiAc0'],
  ['a short string', 'asaltof16chars..', 123456,
    '$6$rounds=123456$asaltof16chars..$BtCwjqMJGx5hrJhZywWvt0RLE8uZ4oPwcelCjmw2kSYu.Ec6ycULevoBK25fs2xXgMNrCzIMVcgEJAstJeonj1'],
  ['the minimum number is still observed', 'roundstoolow', 10,
    '$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaTfF4ZEQpyUNGc0dqbpBYYBaHHrsX.'],
];

describe('sha512crypt', () => {
  it.each(VECTORS)('matches the spec vector for %j', (key, salt, rounds, expected) => {
    expect(sha512crypt(key, salt, rounds)).toBe(expected);
  });

  it('agrees with `openssl passwd -6` on random unicode passwords (password on stdin)', () => {
    // openssl reads one password per line (no newline, CR or NUL inside) and prints <NULL> for an empty one.
    const password = fc.string({ unit: 'binary', minLength: 1, maxLength: 40 })
      .filter((s) => !/[\n\r\0]/.test(s));
    // Each range of UTF-8 lengths once for sure: ASCII, 2-byte, 3-byte (BMP), 4-byte (astral), and mixed.
    const planes = ['plain ascii', 'héllo wörld', '日本語のパスワード', '😀🔐𝄞', 'a é 中 😀'];
    const passwords = [...planes, ...fc.sample(password, 15)];
    // Passwords on stdin keep argv free of them; one openssl run per salt (salts are not secret),
    // each hashing a batch of passwords, one per line.
    for (let i = 0; i < passwords.length; i += 10) {
      const batch = passwords.slice(i, i + 10);
      const salt = randomSalt();
      const expected = execFileSync('openssl', ['passwd', '-6', '-salt', salt, '-stdin'], {
        input: Buffer.from(batch.map((pw) => `${pw}\n`).join(''), 'utf8'),
      }).toString('utf8').split('\n');
      expect(expected.slice(batch.length)).toEqual(['']);
      batch.forEach((pw, j) => expect(sha512crypt(pw, salt), JSON.stringify(pw)).toBe(expected[j]));
    }
  });

  it('randomSalt gives 16 characters of the crypt alphabet, different each time', () => {
    const a = randomSalt();
    const b = randomSalt();
    expect(a).toMatch(/^[./0-9A-Za-z]{16}$/);
    expect(b).toMatch(/^[./0-9A-Za-z]{16}$/);
    expect(a).not.toBe(b);
  });

  it('hashPassword produces a verifiable $6$ hash that does not contain the password', () => {
    const pw = 'correct horse battery staple';
    const h = hashPassword(pw);
    const m = /^\$6\$([./0-9A-Za-z]{16})\$([./0-9A-Za-z]{86})$/.exec(h);
    expect(m).not.toBeNull();
    expect(sha512crypt(pw, m![1]!)).toBe(h);
    expect(h).not.toContain(pw);
  });

  it('rejects salts that would break the $-separated format', () => {
    expect(() => sha512crypt('x', 'a$b')).toThrow(RangeError);
    expect(() => sha512crypt('x', 'a\nb')).toThrow(RangeError);
  });
});
