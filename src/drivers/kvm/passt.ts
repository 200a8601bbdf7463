/**
 * passt: the default network back end of a workload. One passt process per VM
 * owns the guest's network and the forwarded SSH port; qemu connects to it
 * through a unix socket in the workload directory (`-netdev stream`).
 *
 * Why: with qemu's user-mode network (slirp) the guest reaches the host's
 * loopback at 10.0.2.2, i.e. every service that binds 127.0.0.1 "because it is
 * private". passt with `--no-map-gw` does not map the gateway to the host's
 * loopback, so those services stay private (tested in
 * test/integration/guest-network.test.ts).
 *
 * `buildPasstArgv` is pure; the rest is process plumbing in the same style as
 * process.ts (pidfile, /proc identity check before any signal), and the
 * launch of one workload's passt.
 */
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import type { Logger } from '../../util/logger.js';
import { DriverError } from '../types.js';
import { SUN_PATH_MAX, vmFile } from './workload-files.js';
import { findPids, outputTail, processArgv, readPidfile, stopIdentified, waitForPidfile } from './process.js';

/** What passt prints (and exits 1 with) when the forwarded port is taken. */
export const PASST_PORT_TAKEN = 'Failed to bind any port';

/**
 * The guest sees the same addresses as under qemu's user-mode network, so an
 * image (or the tiny test guest's static config) behaves the same in both
 * modes: 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3 (forwarded to the
 * host's resolver, port 53 only).
 */
export const PASST_GUEST = { address: '10.0.2.15', prefix: 24, gateway: '10.0.2.2', dns: '10.0.2.3' } as const;

export interface PasstArgs {
  /** Unix socket qemu connects to. */
  socket: string;
  pidfile: string;
  logFile: string;
  bindAddress: string;
  sshPort: number;
  /**
   * `--runas UID:GID`. passt started as root drops to `nobody` by default,
   * which then cannot write its pidfile into the 0700 workload directory;
   * the driver passes its own ids when it runs as root. Unset otherwise.
   */
  runAs?: { uid: number; gid: number };
}

// eslint-disable-next-line no-control-regex
const BAD_CHARS = /[\u0000-\u001f\u007f]/;

function absPath(p: string, what: string): string {
  if (!path.isAbsolute(p)) throw new RangeError(`${what} must be absolute`);
  if (BAD_CHARS.test(p)) throw new RangeError(`control character in ${what}`);
  return p;
}

export function buildPasstArgv(a: PasstArgs): string[] {
  const socket = absPath(a.socket, 'socket');
  if (Buffer.byteLength(socket) > SUN_PATH_MAX) {
    throw new RangeError(`passt socket path longer than ${SUN_PATH_MAX} bytes: use a shorter vmRoot`);
  }
  if (!Number.isInteger(a.sshPort) || a.sshPort < 1 || a.sshPort > 65535) throw new RangeError('sshPort out of range');
  // passt splits the spec on '/', ':', ',', '-', '~' and '%': an address containing any of
  // those other than an IPv6 colon would change its meaning, so only plain IPs are accepted.
  if (!/^(\d{1,3}(\.\d{1,3}){3}|[0-9a-fA-F:]+)$/.test(a.bindAddress)) {
    throw new RangeError('bindAddress must be a literal IPv4 or IPv6 address for passt');
  }
  const argv = [
    '--quiet',
    // Quit when qemu disconnects: passt's lifetime follows the VM's even if
    // qemu dies without the agent noticing.
    '--one-off',
    '--socket', socket,
    '--pid', absPath(a.pidfile, 'pidfile'),
    '--log-file', absPath(a.logFile, 'logFile'),
    // The point of this mode: traffic to the gateway is not mapped to the host's loopback.
    '--no-map-gw',
    '--address', PASST_GUEST.address,
    '--netmask', String(PASST_GUEST.prefix),
    '--gateway', PASST_GUEST.gateway,
    '--dns', PASST_GUEST.dns,
    '--dns-forward', PASST_GUEST.dns,
    // Inbound: only the SSH forward, on the configured address only.
    '--tcp-ports', `${a.bindAddress}/${a.sshPort}:22`,
    '--udp-ports', 'none',
  ];
  if (a.runAs) {
    if (!Number.isInteger(a.runAs.uid) || !Number.isInteger(a.runAs.gid) || a.runAs.uid < 0 || a.runAs.gid < 0) {
      throw new RangeError('runAs ids must be non-negative integers');
    }
    argv.push('--runas', `${a.runAs.uid}:${a.runAs.gid}`);
  }
  return argv;
}

/**
 * Whether `argv` is the passt serving `socket`. The socket lives in the
 * workload directory, so it names exactly one VM. (passt rewrites some of its
 * own argv in place, e.g. `--runas 0:0` shows as `0 0`; the socket path is
 * left alone.)
 */
export function argvIsPasstFor(argv: readonly string[], socket: string): boolean {
  for (let i = 0; i < argv.length - 1; i++) {
    if ((argv[i] === '--socket' || argv[i] === '-s') && argv[i + 1] === socket) return true;
  }
  return false;
}

export async function isPasstProcess(pid: number, socket: string): Promise<boolean> {
  const argv = await processArgv(pid);
  return argv !== undefined && argvIsPasstFor(argv, socket);
}

/** Every live passt serving `socket` (finds one whose pidfile is gone). */
export function findPasstPids(socket: string): Promise<number[]> {
  return findPids((argv) => argvIsPasstFor(argv, socket));
}

/**
 * Stop every passt of this socket (pidfile's pid and any found by scan, or in
 * `scanned` when the caller has just listed the processes):
 * SIGTERM, then SIGKILL after `timeoutMs`; a pid is signalled only while its
 * cmdline still names this socket.
 */
export async function stopPasst(socket: string, pidfile: string, timeoutMs: number, scanned?: ReadonlyArray<{ pid: number; argv: readonly string[] }>): Promise<void> {
  const pids = new Set(scanned ? scanned.filter((p) => argvIsPasstFor(p.argv, socket)).map((p) => p.pid) : await findPasstPids(socket));
  const fromFile = await readPidfile(pidfile);
  if (fromFile !== undefined) pids.add(fromFile);
  for (const pid of pids) await stopIdentified(pid, () => isPasstProcess(pid, socket), timeoutMs, `passt for ${socket}`);
}

export interface PasstLaunch {
  /** The workload directory: socket, pidfile and log go there. */
  dir: string;
  binary: string;
  bindAddress: string;
  sshPort: number;
  /** How long passt may take to daemonize and write its pidfile. */
  startTimeoutMs: number;
  stopTimeoutMs: number;
  log: Logger;
}

/**
 * Start a workload's passt (it daemonizes once its socket and the SSH port are
 * bound) and check the pidfile names it. 'port-taken' when the SSH port is
 * held by someone else; then, as on a throw, no passt of this workload is left running.
 */
export async function launchPasst(l: PasstLaunch): Promise<'ok' | 'port-taken'> {
  const socket = vmFile(l.dir, 'passtSocket');
  const pidfile = vmFile(l.dir, 'passtPidfile');
  // Leftovers of a previous attempt (its passt is already stopped) would be mistaken for this one's.
  await rm(socket, { force: true });
  await rm(pidfile, { force: true });
  const uid = process.getuid?.();
  const gid = process.getgid?.();
  const argv = buildPasstArgv({
    socket,
    pidfile,
    logFile: vmFile(l.dir, 'passtLog'),
    bindAddress: l.bindAddress,
    sshPort: l.sshPort,
    runAs: uid === 0 && gid !== undefined ? { uid, gid } : undefined,
  });
  const t = Date.now();
  const res = await execa(l.binary, argv, {
    stdin: 'ignore',
    stdout: 'ignore',
    stderr: 'pipe',
    reject: false,
    timeout: l.startTimeoutMs,
  });
  l.log.info({ phase: 'passt', ms: Date.now() - t, exitCode: res.exitCode, sshPort: l.sshPort }, 'passt launcher returned');
  if (res.exitCode !== 0) {
    await stopPasst(socket, pidfile, l.stopTimeoutMs);
    const stderr = outputTail(res.stderr as string | undefined);
    if (stderr.includes(PASST_PORT_TAKEN)) return 'port-taken';
    if (res.timedOut) throw new DriverError('timeout', 'passt did not start in time', stderr);
    throw new DriverError('launch_failed', `passt could not be started: ${res.shortMessage ?? `exit code ${res.exitCode}`}`, stderr);
  }
  const pid = await waitForPidfile(pidfile, l.startTimeoutMs);
  if (pid === undefined || !(await isPasstProcess(pid, socket))) {
    await stopPasst(socket, pidfile, l.stopTimeoutMs);
    throw new DriverError('launch_failed', 'passt did not stay up (no pidfile or wrong process)');
  }
  return 'ok';
}
