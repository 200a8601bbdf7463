/**
 * SHA-512 crypt hashes for cloud-init, made by the system's libcrypt through
 * one long-lived perl process (perl-base is Essential on Debian, and its
 * `crypt` is libcrypt's). The 5000 rounds are faster there than in
 * sha512crypt.ts, whose every round crosses from JS into OpenSSL, and they run
 * on another core, off the event loop, on a spawn's critical path
 * (docs/performance.md).
 *
 * The password reaches perl through a pipe, hex-encoded, never argv, env or a
 * file. The helper proves itself on a known vector before its first use, every
 * answer is checked for shape and salt, and whenever it is missing, broken,
 * slow or dead the hash is made in-process instead: slower, never wrong.
 */
import { spawn, type ChildProcessByStdio } from 'node:child_process';
import type { Readable, Writable } from 'node:stream';
import type { Logger } from './logger.js';
import { randomSalt, sha512crypt } from './sha512crypt.js';

export interface PasswordHasher {
  /** `$6$<16-char salt>$<86 chars>` for `password`, with a fresh salt. */
  hash(password: string): Promise<string>;
  /** Let go of any helper process. */
  close(): void;
}

/** Reads `<id> <hex password> <salt>` lines, answers `<id> <crypt>` (or `<id> *` when crypt fails). */
const PERL_SCRIPT = [
  '$| = 1;',
  'while (my $l = <STDIN>) {',
  '  chomp $l;',
  '  my ($id, $hex, $salt) = split / /, $l;',
  '  my $h = crypt(pack("H*", $hex), "\\$6\\$$salt\\$");',
  '  print "$id ", (defined $h && length $h ? $h : "*"), "\\n";',
  '}',
].join('\n');

/** Ulrich Drepper's spec vector: what a working `$6$` crypt must give (also asserted for sha512crypt.ts in its tests). */
const SELF_TEST = {
  password: 'Hello world!',
  salt: 'saltstring',
  hash: '$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1',
};

const HASH_TAIL = /^[./0-9A-Za-z]{86}$/;

interface Waiter {
  salt: string;
  resolve: (hash: string) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

type Helper = ChildProcessByStdio<Writable, Readable, null>;

export class LibcryptHasher implements PasswordHasher {
  private helper: Helper | undefined;
  /** Resolves true once the helper passed the self-test; false when it cannot be used. */
  private ready: Promise<boolean> | undefined;
  private readonly waiting = new Map<number, Waiter>();
  private nextId = 1;
  private pendingOutput = '';
  /** perl is not there (ENOENT): stop trying. */
  private unavailable = false;
  private closed = false;

  constructor(
    private readonly opts: { perl?: string; logger?: Logger; timeoutMs?: number } = {},
  ) {}

  async hash(password: string): Promise<string> {
    const salt = randomSalt();
    if (!this.closed && !this.unavailable && (await this.start())) {
      try {
        return await this.ask(password, salt);
      } catch (err) {
        this.opts.logger?.warn({ err: (err as Error).message }, 'libcrypt helper failed; hashing in-process');
        this.discard();
      }
    }
    return sha512crypt(password, salt);
  }

  close(): void {
    this.closed = true;
    this.discard();
  }

  private start(): Promise<boolean> {
    this.ready ??= this.launch();
    return this.ready;
  }

  private async launch(): Promise<boolean> {
    let child: Helper;
    try {
      child = spawn(this.opts.perl ?? 'perl', ['-e', PERL_SCRIPT], {
        stdio: ['pipe', 'pipe', 'ignore'],
        // Nothing of the agent's environment is needed; LC_ALL=C keeps perl quiet about locales.
        env: { PATH: process.env.PATH ?? '/usr/bin:/bin', LC_ALL: 'C' },
      });
    } catch (err) {
      this.unavailable = true;
      this.opts.logger?.info({ err: (err as Error).message }, 'no libcrypt helper; hashing passwords in-process');
      return false;
    }
    this.helper = child;
    // Never what keeps the agent alive; it ends with EOF on its stdin when the agent exits.
    child.unref();
    (child.stdin as unknown as { unref?: () => void }).unref?.();
    (child.stdout as unknown as { unref?: () => void }).unref?.();
    child.stdin.on('error', () => undefined);
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (chunk: string) => this.onOutput(chunk));
    child.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT' && !this.unavailable) {
        this.unavailable = true;
        this.opts.logger?.info({ perl: this.opts.perl ?? 'perl' }, 'no perl for the libcrypt helper; hashing passwords in-process');
      }
      this.failAll(err);
    });
    child.on('exit', () => {
      if (this.helper === child) this.discard();
    });
    try {
      const got = await this.ask(SELF_TEST.password, SELF_TEST.salt);
      if (got !== SELF_TEST.hash) throw new Error(`self-test gave ${got}`);
      return true;
    } catch (err) {
      if (!this.unavailable) this.opts.logger?.warn({ err: (err as Error).message }, 'libcrypt helper unusable; hashing passwords in-process');
      this.unavailable = true;
      this.discard();
      return false;
    }
  }

  private ask(password: string, salt: string): Promise<string> {
    const helper = this.helper;
    if (!helper) return Promise.reject(new Error('helper not running'));
    const id = this.nextId++;
    return new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        reject(new Error('libcrypt helper did not answer in time'));
      }, this.opts.timeoutMs ?? 2000);
      this.waiting.set(id, { salt, resolve, reject, timer });
      helper.stdin.write(`${id} ${Buffer.from(password, 'utf8').toString('hex')} ${salt}\n`);
    });
  }

  private onOutput(chunk: string): void {
    this.pendingOutput += chunk;
    let nl: number;
    while ((nl = this.pendingOutput.indexOf('\n')) >= 0) {
      const line = this.pendingOutput.slice(0, nl);
      this.pendingOutput = this.pendingOutput.slice(nl + 1);
      const space = line.indexOf(' ');
      const id = Number(line.slice(0, space));
      const w = this.waiting.get(id);
      if (!w) continue;
      this.waiting.delete(id);
      clearTimeout(w.timer);
      const hash = line.slice(space + 1);
      const prefix = `$6$${w.salt}$`;
      if (hash.startsWith(prefix) && HASH_TAIL.test(hash.slice(prefix.length))) w.resolve(hash);
      else w.reject(new Error('libcrypt helper gave a malformed hash'));
    }
  }

  private failAll(err: Error): void {
    for (const [id, w] of this.waiting) {
      this.waiting.delete(id);
      clearTimeout(w.timer);
      w.reject(err);
    }
  }

  /** Drop the helper (the next hash starts a new one unless perl is unusable or we are closed). */
  private discard(): void {
    const child = this.helper;
    this.helper = undefined;
    this.ready = undefined;
    this.pendingOutput = '';
    this.failAll(new Error('libcrypt helper stopped'));
    if (child) {
      child.stdin.end();
      child.kill('SIGKILL');
    }
  }
}

/** The in-process implementation alone (tests, and hosts without perl). */
export const inProcessHasher: PasswordHasher = {
  hash: (password) => Promise.resolve(sha512crypt(password, randomSalt())),
  close: () => undefined,
};
