import { createServer, connect } from 'node:net';
import { readFileSync, existsSync, readdirSync } from 'node:fs';

/** True if something accepts TCP connections on host:port. */
export function isListening(port: number, host = '127.0.0.1'): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ port, host });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/** True if this process could bind host:port right now (nobody holds it). */
export function isFree(port: number, host = '127.0.0.1'): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.once('error', () => resolve(false));
    srv.listen(port, host, () => srv.close(() => resolve(true)));
  });
}

/** Is `pid` alive, and (if given) does its command line contain `needle`? */
export function processRuns(pid: number, needle?: string): boolean {
  const path = `/proc/${pid}/cmdline`;
  if (!existsSync(path)) return false;
  try {
    const cmd = readFileSync(path, 'utf8');
    // A zombie has an empty cmdline: it is gone for our purposes.
    return cmd.length > 0 && (needle === undefined || cmd.includes(needle));
  } catch {
    return false;
  }
}

/** Pids of running qemu processes whose argv mentions `needle`. */
export function qemuPidsMatching(needle: string): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmd = readFileSync(`/proc/${entry}/cmdline`, 'utf8');
      if (cmd.includes('qemu-system') && cmd.includes(needle)) pids.push(Number(entry));
    } catch {
      /* raced with exit */
    }
  }
  return pids;
}

export async function until(pred: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (await pred()) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
}
