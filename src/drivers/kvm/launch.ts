/**
 * A workload's host processes: launching them (an SSH port, passt in that
 * mode, qemu started paused and daemonized, its pidfile and identity, its CPU
 * and OOM preferences) and stopping them. A launch registers each thing it
 * takes on the caller's Reverter the moment it has taken it.
 */
import { chmod, writeFile } from 'node:fs/promises';
import { execa } from 'execa';
import type { TapSlot } from '../../hostnet/plan.js';
import type { Logger } from '../../util/logger.js';
import { Reverter } from '../../util/revert.js';
import { DriverError, type WorkloadSpec } from '../types.js';
import { buildQemuArgv } from './argv.js';
import type { KvmDriverConfig } from './config.js';
import { launchPasst, stopPasst } from './passt.js';
import type { PortAllocator } from './ports.js';
import {
  argvHasVmName,
  isVmProcess,
  listProcesses,
  lowerPriorityWhileLaunching,
  lowerProcessPriority,
  outputTail,
  readPidfile,
  setOomScoreAdj,
  stopVmProcess,
  waitForPidfile,
} from './process.js';
import { writeVmMeta, type VmMeta } from './vm-meta.js';
import { vmFile } from './workload-files.js';

/** What qemu prints (and exits 1 with) when the hostfwd port is taken. */
const HOSTFWD_TAKEN = 'Could not set up host forwarding rule';
const PORT_TRIES = 5;

/** What one create knows of the VM it is launching. */
export interface LaunchingVm {
  dir: string;
  name: string;
  uuid: string;
  readyToken: string;
  spec: Pick<WorkloadSpec, 'id' | 'vcpus' | 'memoryMb'>;
  log: Logger;
  slot?: TapSlot;
  /** An idle warm-pool VM: it gets a guest-agent channel, and vm.json says `warm: idle`. */
  idle?: boolean;
}

/** The driver's side of a launch. */
export interface LaunchHost {
  config: KvmDriverConfig;
  accel: 'kvm' | 'tcg';
  /** SSH ports outside tap mode. */
  ports: PortAllocator;
}

/**
 * Take a port and start qemu paused on it (trying the next port when the
 * forward cannot bind), wait for its pidfile and check the pid is this VM.
 * Everything taken is registered in `revert` as it is taken.
 */
export async function launchVm(vm: LaunchingVm, host: LaunchHost, revert: Reverter): Promise<{ pid: number; port: number }> {
  const { config, accel, ports } = host;
  const { dir, name, log, slot } = vm;
  const nice = config.guestNice ?? 0;
  const tried = new Set<number>();
  let loweredEarly: number | undefined;
  let port: number;
  for (let attempt = 1; ; attempt++) {
    // A slot's port is forwarded by nftables, not bound by qemu: nothing to try.
    const next = slot ? slot.port : await ports.allocate(tried);
    if (next === undefined) throw new DriverError('capacity', 'no free SSH port in the configured range');
    port = next;
    tried.add(port);
    // What one attempt takes is given back before the next attempt, or with the rest on a failure.
    const taken = new Reverter((err) => log.error({ err }, 'a cleanup step after a failed launch attempt failed'));
    revert.add(() => taken.fail());
    if (!slot) taken.add(() => ports.release(port));
    const outcome = await startOnPort(vm, host, port, taken);
    if ('started' in outcome) {
      loweredEarly = outcome.loweredEarly;
      break;
    }
    if (slot || attempt >= PORT_TRIES) throw outcome.portTaken;
    log.warn({ sshPort: port, attempt }, 'ssh port taken by another process, trying the next one');
    await taken.fail();
  }

  const t = Date.now();
  const pid = await waitForPidfile(vmFile(dir, 'pidfile'), config.pidfileTimeoutMs);
  if (pid === undefined) throw new DriverError('timeout', 'qemu pidfile did not appear in time');
  if (!(await isVmProcess(pid, name))) {
    throw new DriverError('launch_failed', `pid ${pid} from the pidfile is not ${name} (qemu died right after start?)`);
  }
  if (nice > 0 && loweredEarly !== pid) {
    // The launcher returned before the early pass saw this pid. (Threads made
    // after an early pass inherit its nice value from the thread that made them.)
    const lowered = await lowerProcessPriority(pid, nice);
    log.debug({ pid, nice, ...lowered }, 'guest CPU priority lowered');
  }
  if (config.guestOomScoreAdj !== undefined) {
    // Best effort: a host that refuses it still runs the VM, only without the OOM preference.
    await setOomScoreAdj(pid, config.guestOomScoreAdj).catch((err: Error) =>
      log.warn({ pid, oomScoreAdj: config.guestOomScoreAdj, err: err.message }, 'could not set the guest OOM score'),
    );
  }
  log.info({ phase: 'pidfile', ms: Date.now() - t, pid, sshPort: port }, 'qemu running, paused');
  return { pid, port };
}

/**
 * One launch attempt on `port`: vm.json, passt (in that mode), then qemu's
 * daemonizing launcher. `portTaken` when passt or qemu's forward could not
 * bind the port, with the error to report if no other port is tried.
 */
async function startOnPort(
  vm: LaunchingVm,
  host: LaunchHost,
  port: number,
  taken: Reverter,
): Promise<{ started: true; loweredEarly?: number } | { portTaken: DriverError }> {
  const { config, accel } = host;
  const { dir, name, uuid, readyToken, spec, log, slot } = vm;
  const network = config.network ?? 'restricted';
  const nice = config.guestNice ?? 0;
  const meta: VmMeta = {
    id: spec.id, name, uuid, sshPort: port, ...(slot ? { slot: slot.index } : {}), createdAt: new Date().toISOString(), readyToken,
    ...(vm.idle ? { warm: 'idle' as const } : {}),
  };
  await writeVmMeta(dir, meta);

  if (network === 'passt') {
    // Registered before the launch: a launch that throws may still leave a passt running (stopPasst finds it by socket).
    taken.add(() => stopPasst(vmFile(dir, 'passtSocket'), vmFile(dir, 'passtPidfile'), config.stopTimeoutMs));
    const passt = await launchPasst({
      dir,
      binary: config.passtBinary ?? 'passt',
      bindAddress: config.bindAddress,
      sshPort: port,
      startTimeoutMs: config.pidfileTimeoutMs,
      stopTimeoutMs: config.stopTimeoutMs,
      log,
    });
    if (passt === 'port-taken') {
      return { portTaken: new DriverError('launch_failed', `passt could not bind SSH port ${port}`) };
    }
  }

  // Empty until the driver drains the console ring into it; 0600 like everything here.
  await writeFile(vmFile(dir, 'serialLog'), '', { mode: 0o600 });
  await chmod(vmFile(dir, 'serialLog'), 0o600);

  const argv = buildQemuArgv({
    accel,
    name,
    uuid,
    dir,
    vcpus: spec.vcpus,
    memoryMb: spec.memoryMb,
    bindAddress: config.bindAddress,
    sshPort: port,
    kernel: config.kernel,
    initrd: config.initrd,
    append: config.append,
    network,
    tap: slot && { device: slot.tap, mac: slot.mac },
    guestAgent: vm.idle ?? false,
  });
  // Even a launcher that fails may leave a daemonized child behind.
  taken.add(() => stopVm(name, dir, config.stopTimeoutMs));
  const t = Date.now();
  const launcher = execa(config.qemuBinary, argv, {
    stdin: 'ignore',
    stdout: 'ignore',
    stderr: 'pipe',
    reject: false,
    // The daemonizing parent returns once the VM is set up; bound it anyway.
    timeout: config.pidfileTimeoutMs,
  });
  const early = nice > 0 ? lowerPriorityWhileLaunching(vmFile(dir, 'pidfile'), name, nice, launcher, log) : undefined;
  const res = await launcher;
  const loweredEarly = await early;
  log.info({ phase: 'qemu', ms: Date.now() - t, exitCode: res.exitCode, sshPort: port }, 'qemu launcher returned');
  if (res.exitCode === 0) return { started: true, loweredEarly };

  const stderr = outputTail(res.stderr as string | undefined);
  const failure = res.timedOut
    ? new DriverError('timeout', 'qemu did not daemonize in time', stderr)
    : res.failed && res.exitCode === undefined
      ? new DriverError('launch_failed', `qemu could not be started: ${res.shortMessage ?? 'unknown error'}`, stderr)
      : new DriverError('launch_failed', `qemu exited with code ${res.exitCode}`, stderr);
  if (stderr.includes(HOSTFWD_TAKEN)) return { portTaken: failure };
  throw failure;
}

/** Stop this VM's processes: its qemu (the pidfile's pid if it is ours, and any process naming the VM) and its passt. */
export async function stopVm(name: string, dir: string, stopTimeoutMs: number): Promise<void> {
  const pids = new Set<number>();
  const fromFile = await readPidfile(vmFile(dir, 'pidfile'));
  if (fromFile !== undefined) pids.add(fromFile);
  // One pass over /proc finds both this VM's qemu and its passt.
  const procs = await listProcesses();
  for (const p of procs) if (argvHasVmName(p.argv, name)) pids.add(p.pid);
  for (const p of pids) await stopVmProcess(p, name, stopTimeoutMs);
  // Whatever the configured mode is now: the VM may date from another one.
  await stopPasst(vmFile(dir, 'passtSocket'), vmFile(dir, 'passtPidfile'), stopTimeoutMs, procs);
}
