/**
 * Is the guest ready for the consumer? Two signals, read without credentials:
 *  - the forwarded port answers with an `SSH-2.0-` banner (qemu listens on the
 *    host port before the guest does, so a TCP connect alone proves nothing);
 *  - for cloud-init guests, cloud-init's final message carrying this VM's
 *    token appears on the serial console — the banner comes before the root
 *    password is set.
 * `waitUntilReady` polls both (and whether the VM still runs) until the guest
 * is ready, dies, or the time is up.
 */
import { connect } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import type { ReadyResult } from '../types.js';

export interface ReadinessProbe {
  /** Whether the VM's process still runs. */
  running: () => Promise<boolean>;
  /** Drain the console and return it as far as it is kept. */
  readConsole: () => Promise<string>;
  /** Where the guest's sshd answers. */
  host: string;
  port: number;
  /** The console line that says cloud-init is done; without one the SSH banner alone is readiness. */
  finalMessage?: string;
}

/** Poll until the guest is ready, its process is gone, or `timeoutMs` after `t0` (when the wait began). */
export async function waitUntilReady(p: ReadinessProbe, opts: { timeoutMs: number; signal?: AbortSignal }, t0 = Date.now()): Promise<ReadyResult> {
  let banner = false;
  for (;;) {
    if (!(await p.running())) return notReady('died', t0, p.readConsole);
    // Drained at every poll, whatever the readiness mode: the boot_failed
    // tail needs it, and the ring must not overwrite cloud-init's final message.
    const console = await p.readConsole();
    // The banner is cheap to keep probing until it first answers; after that
    // only the console marker is awaited.
    banner ||= await probeSshBanner(p.host, p.port, 2000);
    if (banner && (p.finalMessage === undefined || console.includes(p.finalMessage))) {
      return { ready: true, ms: Date.now() - t0 };
    }
    if (Date.now() - t0 >= opts.timeoutMs || opts.signal?.aborted) return notReady('timeout', t0, p.readConsole);
    // A boot takes seconds to minutes: a half-second poll costs nothing and
    // reacts to a dead qemu at once.
    await sleep(500);
  }
}

/** A boot that ended without readiness, with the console's last lines (a dead qemu's ring is gone: what the last reads drained). */
export async function notReady(reason: 'died' | 'timeout', t0: number, readConsole: () => Promise<string>): Promise<ReadyResult> {
  const ms = Date.now() - t0;
  return { ready: false, reason, ms, consoleTail: consoleTail(await readConsole()) };
}

/** Read the first bytes a TCP server sends; true if they start an SSH banner. */
export function probeSshBanner(host: string, port: number, timeoutMs = 3000): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = connect({ host, port });
    let buf = '';
    const done = (ok: boolean) => {
      clearTimeout(timer);
      sock.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    sock.setEncoding('latin1');
    sock.on('data', (chunk: string) => {
      buf += chunk;
      if (buf.length >= 8 || buf.includes('\n')) done(buf.startsWith('SSH-2.0-'));
    });
    sock.on('error', () => done(false));
    sock.on('end', () => done(false));
  });
}

/** The host address to probe a forward bound to `bindAddress` on. */
export function probeHost(bindAddress: string): string {
  if (bindAddress === '0.0.0.0' || bindAddress === '') return '127.0.0.1';
  if (bindAddress === '::') return '::1';
  return bindAddress;
}

/**
 * The last lines of a serial log as plain text: ANSI escapes and other control
 * characters removed, at most `maxLines` lines and `maxChars` characters.
 */
export function consoleTail(text: string, maxLines = 25, maxChars = 3000): string {
  const clean = text
    .replace(/\x1b\[[0-9;?]*[ -/]*[@-~]/g, '')
    .replace(/\r/g, '')
    .replace(/[\x00-\x08\x0b-\x1f\x7f]/g, '');
  const lines = clean.split('\n').filter((l) => l.trim() !== '');
  const tail = lines.slice(-maxLines).join('\n');
  return tail.length > maxChars ? tail.slice(-maxChars) : tail;
}
