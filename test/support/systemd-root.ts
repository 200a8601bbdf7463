/**
 * The Debian 12 root the real-systemd test boots with `systemd-nspawn -b`
 * (scripts/build-systemd-root.sh), and the container, network namespace and
 * relay helpers around it. Built once into the user cache, like the guests.
 */
import { execa, type ResultPromise } from 'execa';
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { ensureGuest, nonEmptyFile } from './guest-cache.js';
import { homedir } from 'node:os';
import { until } from './net.js';

const REPO_ROOT = resolve(import.meta.dirname, '..', '..');
/** VERSION in scripts/build-systemd-root.sh: an older cached root is rebuilt. */
export const SYSTEMD_ROOT_VERSION = '1';

export function systemdRootPaths(env: NodeJS.ProcessEnv = process.env): { dir: string; tarball: string } {
  const cache = env.PAYGRESS_CACHE_DIR || join(env.HOME || homedir(), '.cache', 'paygress-agent');
  const dir = join(cache, 'systemd-root');
  return { dir, tarball: join(dir, 'root.tar.zst') };
}

function systemdRootBuilt(p = systemdRootPaths()): boolean {
  try {
    return readFileSync(join(p.dir, 'version'), 'utf8').trim() === SYSTEMD_ROOT_VERSION && nonEmptyFile(p.tarball);
  } catch {
    return false;
  }
}

/** The cached root's tarball, building it first (mmdebstrap, a few minutes) if missing. */
export function ensureSystemdRoot(): Promise<{ dir: string; tarball: string }> {
  return ensureGuest({
    script: join(REPO_ROOT, 'scripts', 'build-systemd-root.sh'),
    paths: () => systemdRootPaths(),
    built: systemdRootBuilt,
    timeoutMs: 20 * 60_000,
  });
}

/** A network namespace of the test's own with only `lo`, up: nothing in it touches the host's network. */
export async function createNetns(name: string): Promise<void> {
  await execa('ip', ['netns', 'add', name]);
  await execa('ip', ['-n', name, 'link', 'set', 'lo', 'up']);
}

export async function deleteNetns(name: string): Promise<void> {
  await execa('ip', ['netns', 'del', name], { reject: false });
}

/** A relay (scripts/relay.ts) listening on 127.0.0.1:port inside the namespace. */
export async function startRelayInNetns(netns: string, port: number): Promise<{ url: string; stop(): Promise<void> }> {
  const proc = execa('ip', ['netns', 'exec', netns, process.execPath, '--import', 'tsx', join(REPO_ROOT, 'scripts', 'relay.ts'), '--port', String(port)], {
    cwd: REPO_ROOT,
    reject: false,
    stdin: 'ignore',
    all: true,
  });
  let out = '';
  proc.all?.on('data', (c: Buffer) => (out += c.toString()));
  await until(() => out.includes('relay listening') || proc.exitCode !== null, 60_000, `relay on ${port} in ${netns}`);
  if (!out.includes('relay listening')) throw new Error(`relay did not start: ${out}`);
  return {
    url: `ws://127.0.0.1:${port}`,
    async stop() {
      proc.kill('SIGTERM');
      await proc;
    },
  };
}

export interface Bind {
  from: string;
  to: string;
  readOnly?: boolean;
}

export interface Container {
  /** The container's root folder on the host. */
  root: string;
  /** The container's PID 1 (systemd) as the host sees it. */
  leader: number;
  /** Run a command inside (all namespaces of PID 1, as root); never rejects. */
  run(argv: string[], opts?: { input?: string; timeoutMs?: number }): Promise<{ exitCode: number; stdout: string; stderr: string }>;
  /** Stop the container (orderly shutdown, then SIGKILL) and delete its root. */
  destroy(): Promise<void>;
}

/**
 * Unpack the cached root and boot it: systemd as PID 1 in its own pid, mount
 * and cgroup namespaces, in the given network namespace. The flags are the
 * ones NOTES.md found to work here (unified hierarchy, bpf syscall filter, no
 * machined registration).
 */
export async function bootContainer(opts: { tarball: string; netns: string; binds: Bind[] }): Promise<Container> {
  const root = mkdtempSync('/var/tmp/pga-nspawn-');
  await execa('tar', ['--zstd', '-xpf', opts.tarball, '-C', root]);
  const argv = [
    '-D', root, '-b', '--register=no', '--keep-unit', '--console=pipe', '--system-call-filter=bpf',
    `--network-namespace-path=/run/netns/${opts.netns}`,
    ...opts.binds.map((b) => `--bind${b.readOnly ? '-ro' : ''}=${b.from}:${b.to}`),
  ];
  const nspawn: ResultPromise = execa('systemd-nspawn', argv, {
    reject: false,
    stdin: 'ignore',
    all: true,
    env: { SYSTEMD_NSPAWN_UNIFIED_HIERARCHY: '1' },
  });
  let console_ = '';
  nspawn.all?.on('data', (c: Buffer) => (console_ += c.toString()));
  let leader = 0;
  const destroy = async (): Promise<void> => {
    if (nspawn.exitCode === null) {
      nspawn.kill('SIGTERM');
      const done = await Promise.race([nspawn.then(() => true), new Promise((r) => setTimeout(() => r(false), 30_000))]);
      if (!done) {
        // Killing a pid namespace's PID 1 kills everything in it.
        if (leader > 0) {
          try {
            process.kill(leader, 'SIGKILL');
          } catch {
            /* already gone */
          }
        }
        nspawn.kill('SIGKILL');
        await nspawn;
      }
    }
    rmSync(root, { recursive: true, force: true });
  };
  try {
    await until(() => {
      if (nspawn.exitCode !== null) throw new Error(`systemd-nspawn exited ${nspawn.exitCode}: ${console_}`);
      // nspawn forks helpers before the child that execs systemd: wait for that one.
      leader = childOf(nspawn.pid!) ?? 0;
      return leader > 0 && commOf(leader) === 'systemd';
    }, 30_000, 'the container PID 1');
    const run: Container['run'] = async (cmd, o = {}) => {
      const r = await execa('nsenter', ['-t', String(leader), '-a', ...cmd], {
        reject: false,
        input: o.input,
        stdin: o.input === undefined ? 'ignore' : undefined,
        timeout: o.timeoutMs ?? 120_000,
        env: { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', LANG: 'C.UTF-8' },
        extendEnv: false,
      });
      return { exitCode: r.exitCode ?? -1, stdout: String(r.stdout), stderr: String(r.stderr) };
    };
    // PID 1 exists before its bus and before /run/systemd/system (until then
    // systemctl says "offline"): ask until it gives a real answer.
    let state = { exitCode: -1, stdout: '', stderr: '' };
    await until(async () => {
      state = await run(['systemctl', 'is-system-running', '--wait'], { timeoutMs: 60_000 });
      return !/Failed to connect to bus/.test(state.stderr) && state.stdout.trim() !== 'offline';
    }, 60_000, 'the container system bus');
    if (!/running|degraded/.test(state.stdout)) throw new Error(`container did not boot: ${state.stdout} ${state.stderr} ${console_}`);
    return { root, leader, run, destroy };
  } catch (err) {
    await destroy();
    throw err;
  }
}

function commOf(pid: number): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return undefined;
  }
}

function childOf(ppid: number): number | undefined {
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      // Fields after the command name, which may hold spaces and parentheses.
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (Number(fields[1]) === ppid) return Number(entry);
    } catch {
      /* raced with exit */
    }
  }
  return undefined;
}

/** The fenced sh block right after `<!-- install:NAME …-->` in README.md, verbatim. */
export function readmeBlock(name: string, readme = join(REPO_ROOT, 'README.md')): string {
  const text = readFileSync(readme, 'utf8');
  const m = new RegExp(`<!-- install:${name}\\b[^>]*-->\\n\`\`\`sh\\n([\\s\\S]*?)\\n\`\`\``).exec(text);
  if (!m) throw new Error(`README.md has no install:${name} block`);
  return m[1]!;
}

