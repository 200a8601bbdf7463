/**
 * Host process plumbing for qemu: pidfiles, identity checks through
 * /proc/<pid>/cmdline (the guard against signalling a recycled pid), and
 * TERM → KILL escalation. Linux only, by design.
 */
import { watch, type FSWatcher } from 'node:fs';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from '../../util/logger.js';
import { qemuOptionValue } from './qemu-option.js';

const POLL_MS = 50;

/** The end of a launcher's output, trimmed: error details keep the last lines, where the reason is. */
export function outputTail(text: string | undefined, max = 2000): string {
  const t = (text ?? '').trim();
  return t.length > max ? t.slice(-max) : t;
}

export async function readPidfile(file: string): Promise<number | undefined> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch {
    return undefined;
  }
  const m = /^\s*(\d+)\s*$/.exec(text);
  if (!m) return undefined;
  const pid = Number(m[1]);
  return Number.isSafeInteger(pid) && pid > 1 ? pid : undefined;
}

/** argv of a live process, or undefined when it is gone (or a zombie: zombies have an empty cmdline). */
export async function processArgv(pid: number): Promise<string[] | undefined> {
  try {
    const raw = await readFile(`/proc/${pid}/cmdline`, 'utf8');
    if (raw.length === 0) return undefined;
    return raw.replace(/\0$/, '').split('\0');
  } catch {
    return undefined;
  }
}

/**
 * Whether `argv` is the qemu we launched as `name`: its `-name` argument is
 * the (escaped) name, alone or followed by `,options`. A prefix match on the
 * raw cmdline would confuse `paygress-vm1` with `paygress-vm10`.
 */
export function argvHasVmName(argv: readonly string[], name: string): boolean {
  const escaped = qemuOptionValue(name);
  for (let i = 0; i < argv.length - 1; i++) {
    if (argv[i] !== '-name') continue;
    const v = argv[i + 1]!;
    if (v === escaped || v.startsWith(`${escaped},`) || v === `guest=${escaped}` || v.startsWith(`guest=${escaped},`)) return true;
  }
  return false;
}

export async function isVmProcess(pid: number, name: string): Promise<boolean> {
  const argv = await processArgv(pid);
  return argv !== undefined && argvHasVmName(argv, name);
}

/** Alive = exists and is not a zombie (a daemonized qemu's zombie may linger if nobody reaps it). */
export async function isAlive(pid: number): Promise<boolean> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}

/** Every live process other than this one, with its argv: one pass over /proc. */
export async function listProcesses(): Promise<Array<{ pid: number; argv: string[] }>> {
  const out: Array<{ pid: number; argv: string[] }> = [];
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    if (pid === process.pid) continue;
    const argv = await processArgv(pid);
    if (argv !== undefined) out.push({ pid, argv });
  }
  return out;
}

/** Every live process (other than this one) whose argv satisfies `matches`. */
export async function findPids(matches: (argv: readonly string[]) => boolean): Promise<number[]> {
  return (await listProcesses()).filter((p) => matches(p.argv)).map((p) => p.pid);
}

/** Every live process whose argv names this VM; finds a qemu whose pidfile is missing. */
export function findVmPids(name: string): Promise<number[]> {
  return findPids((argv) => argvHasVmName(argv, name));
}

/**
 * Resolve once `file` holds a pid, or undefined after `timeoutMs`. fs.watch on
 * the directory wakes us as soon as qemu writes the file; a slow poll covers
 * the cases inotify misses (e.g. the write landing before the watch starts).
 */
export async function waitForPidfile(file: string, timeoutMs: number): Promise<number | undefined> {
  const first = await readPidfile(file);
  if (first !== undefined) return first;
  const deadline = Date.now() + timeoutMs;
  let watcher: FSWatcher | undefined;
  let wake: (() => void) | undefined;
  try {
    try {
      watcher = watch(path.dirname(file), () => wake?.());
      watcher.on('error', () => undefined);
    } catch {
      watcher = undefined;
    }
    for (;;) {
      const pid = await readPidfile(file);
      if (pid !== undefined) return pid;
      const left = deadline - Date.now();
      if (left <= 0) return undefined;
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, Math.min(left, 250));
        wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      wake = undefined;
    }
  } finally {
    watcher?.close();
  }
}

export async function waitForExit(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!(await isAlive(pid))) return true;
    if (Date.now() >= deadline) return false;
    await sleep(POLL_MS);
  }
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
  }
}

export type StopOutcome = 'not-running' | 'terminated' | 'killed';

/**
 * Stop the qemu named `name` running as `pid`: SIGTERM, wait `stopTimeoutMs`,
 * SIGKILL. Signals only while /proc/<pid>/cmdline still names this VM, so a
 * recycled pid is never hit. Throws if the process survives SIGKILL.
 */
export function stopVmProcess(pid: number, name: string, stopTimeoutMs: number): Promise<StopOutcome> {
  return stopIdentified(pid, () => isVmProcess(pid, name), stopTimeoutMs, name);
}

/**
 * SIGTERM, wait `stopTimeoutMs`, SIGKILL — each signal sent only while
 * `isOurs()` still holds, so a recycled pid is never hit. Throws if the
 * process survives SIGKILL.
 */
export async function stopIdentified(
  pid: number,
  isOurs: () => Promise<boolean>,
  stopTimeoutMs: number,
  what: string,
): Promise<StopOutcome> {
  if (!(await isOurs())) return 'not-running';
  signal(pid, 'SIGTERM');
  if (await waitForExit(pid, stopTimeoutMs)) return 'terminated';
  if (!(await isOurs())) return 'terminated';
  signal(pid, 'SIGKILL');
  if (await waitForExit(pid, 5_000)) return 'killed';
  throw new Error(`process ${pid} (${what}) survived SIGKILL`);
}

/** Set a process's OOM killer preference (-1000..1000); without privileges only upwards from what it inherited. */
export async function setOomScoreAdj(pid: number, adj: number): Promise<void> {
  if (!Number.isInteger(adj) || adj < -1000 || adj > 1000) throw new RangeError('oom_score_adj must be an integer in -1000..1000');
  await writeFile(`/proc/${pid}/oom_score_adj`, String(adj));
}

/**
 * Lower the CPU priority of a running qemu: every thread's nice value
 * (setpriority on each tid; threads qemu creates later inherit it from their
 * creator) and, where the kernel groups by session (sched_autogroup, Linux's
 * default on desktops and many servers), the nice value of qemu's autogroup.
 * The second matters because `-daemonize` calls setsid(): qemu lands in its
 * own autogroup, which the scheduler weighs like the agent's whole session,
 * so a per-thread nice alone would change nothing between the two.
 *
 * All guests get the same value, so tenants stay equal among themselves; the
 * host's own work (the agent's next spawn, sshd, the relay connection) wins
 * when the CPU is contended. Best effort: a thread that exits meanwhile is
 * skipped; the returned counts say what was changed.
 */
export async function lowerProcessPriority(pid: number, nice: number): Promise<{ threads: number; autogroup: boolean }> {
  if (!Number.isInteger(nice) || nice < 1 || nice > 19) throw new RangeError('nice must be an integer in 1..19');
  let autogroup = false;
  try {
    await writeFile(`/proc/${pid}/autogroup`, String(nice));
    autogroup = true;
  } catch {
    // No autogroup support (or disabled): thread nice values alone decide.
  }
  const done = new Set<number>();
  // Twice: a thread created while the first pass runs may have been cloned
  // from one not yet lowered. qemu starts its threads during setup, before
  // the daemonizing parent returns, so the second pass rarely finds any.
  for (let pass = 0; pass < 2; pass++) {
    let tids: string[];
    try {
      tids = await readdir(`/proc/${pid}/task`);
    } catch {
      break; // the process is gone
    }
    for (const t of tids) {
      const tid = Number(t);
      if (!Number.isSafeInteger(tid) || done.has(tid)) continue;
      try {
        os.setPriority(tid, nice);
        done.add(tid);
      } catch {
        // The thread exited between readdir and setpriority.
      }
    }
  }
  return { threads: done.size, autogroup };
}

/**
 * Lower a new qemu's priority as soon as its pidfile names it, while its
 * daemonizing launcher still runs: the child is already in its own session
 * (autogroup) at full weight and its vCPU spins before the parent returns,
 * which under a burst starves the agent's next spawns. Polls finely, as a
 * launch is over in a fraction of a second. Best effort: returns the pid it
 * lowered, if it got to one, and the caller checks identity again.
 */
export async function lowerPriorityWhileLaunching(
  pidfile: string,
  name: string,
  nice: number,
  launch: Promise<unknown>,
  log: Logger,
): Promise<number | undefined> {
  let settled = false;
  void launch.finally(() => {
    settled = true;
  });
  while (!settled) {
    const pid = await readPidfile(pidfile);
    if (pid !== undefined && (await isVmProcess(pid, name))) {
      try {
        const lowered = await lowerProcessPriority(pid, nice);
        log.debug({ pid, nice, ...lowered }, 'guest CPU priority lowered during launch');
        return pid;
      } catch (err) {
        log.debug({ err }, 'could not lower guest priority during launch');
        return undefined;
      }
    }
    await sleep(5);
  }
  return undefined;
}
