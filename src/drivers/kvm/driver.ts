/**
 * KVM/qemu lifecycle: overlay copy → port → qemu -S -daemonize → pidfile →
 * identity check, while beside it the password is hashed and the seed ISO
 * written; then QMP attaches the seed and starts the VM. One directory per
 * workload under vmRoot holds everything it owns; every resource a create
 * takes is released if a later step fails.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { statSync } from 'node:fs';
import { appendFile, chmod, mkdir, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import type { Logger } from '../../util/logger.js';
import { LibcryptHasher, type PasswordHasher } from '../../util/password-hasher.js';
import {
  DriverError,
  type ComputeDriver,
  type IdleSpec,
  type WorkloadHandle,
  type ReadyResult,
  type WorkloadInspection,
  type WorkloadSpec,
} from '../types.js';
import { resolveAccel } from './accel.js';
import { attachSeedAndStart, buildQemuArgv, readConsoleRing, SUN_PATH_MAX, vmFile } from './argv.js';
import { buildCloudConfig, buildIdleCloudConfig, finalMessageFor } from './cloud-config.js';
import { tapNetworkOf, type KvmDriverConfig } from './config.js';
import { PortAllocator } from './ports.js';
import { SlotAllocator } from './slots.js';
import type { TapSlot } from '../../hostnet/plan.js';
import { argvHasVmName, listProcesses, isVmProcess, lowerProcessPriority, readPidfile, setOomScoreAdj, stopVmProcess, waitForPidfile } from './process.js';
import { OverlayError, OverlayTemplates } from './overlay.js';
import { freeBytesUnder } from '../../util/free-space.js';
import { buildPasstArgv, isPasstProcess, PASST_PORT_TAKEN, stopPasst } from './passt.js';
import { runQmp } from './qmp.js';
import { writeSeedIso } from './seed.js';
import { consoleTail, probeHost, probeSshBanner } from './readiness.js';
import { KvmWarmPool, type WarmPoolHost, type WarmState } from './warm-pool.js';

/** What vm.json holds: enough to find and stop the workload later. No secrets. */
export interface VmMeta {
  id: string;
  name: string;
  uuid: string;
  sshPort: number;
  /** Tap network slot (src/hostnet/plan.ts), in `tap` mode. */
  slot?: number;
  createdAt: string;
  /** Appears in cloud-init's final message on the serial console. Not a secret. */
  readyToken: string;
  /** Warm-pool VMs only (warm-pool.ts): `idle` until a hand-off starts, then `handed-off`. */
  warm?: WarmState;
}

/** An idle warm-pool VM as the create path sees it: no tenant yet, its id for a hostname. */
type IdleLaunch = IdleSpec & { hostname: string; idle: true };
type LaunchSpec = WorkloadSpec | IdleLaunch;

function isIdle(spec: LaunchSpec): spec is IdleLaunch {
  return 'idle' in spec;
}

const MAX_ID_LENGTH = 40;
const ID_RE = new RegExp(`^[a-z0-9-]{1,${MAX_ID_LENGTH}}$`);
const HOSTFWD_TAKEN = 'Could not set up host forwarding rule';
const PORT_TRIES = 5;
const DEFAULT_CONSOLE_LOG_BYTES = 256 * 1024;

function tail(text: string | undefined, max = 2000): string {
  const t = (text ?? '').trim();
  return t.length > max ? t.slice(-max) : t;
}

export class KvmDriver implements ComputeDriver {
  readonly kind = 'kvm';
  private readonly ports: PortAllocator;
  /** In `tap` mode: the slot pool; the slot's port replaces the port allocator's. */
  private readonly slots: SlotAllocator | undefined;
  private readonly overlays: OverlayTemplates;
  private accel: Promise<'kvm' | 'tcg'> | undefined;
  /** Console text kept per workload being watched (the file's content, or newer when the disk was full). */
  private readonly consoles = new Map<string, { text: Buffer; dirty: boolean }>();
  /** Console reads per id run one after another: each appends what the previous left. */
  private readonly consoleReads = new Map<string, Promise<string>>();
  /** Serialises create/destroy per id so a destroy never races a half-done create. */
  private readonly locks = new Map<string, Promise<unknown>>();
  /** Booting idle VMs ahead of demand and handing them to tenants (warm-pool.ts). */
  readonly warm: KvmWarmPool<VmMeta>;

  constructor(
    private readonly config: KvmDriverConfig,
    private readonly logger: Logger,
    private readonly hasher: PasswordHasher = new LibcryptHasher({ logger }),
  ) {
    if (!path.isAbsolute(config.vmRoot)) throw new RangeError('vmRoot must be an absolute path');
    if (!path.isAbsolute(config.baseImage)) throw new RangeError('baseImage must be an absolute path');
    // qemu's QMP socket and passt's socket live in the workload folder; a unix socket path has at most SUN_PATH_MAX bytes.
    const longestDir = path.join(config.vmRoot, 'x'.repeat(MAX_ID_LENGTH));
    const longestSocket = [vmFile(longestDir, 'qmpSocket'), vmFile(longestDir, 'passtSocket'), vmFile(longestDir, 'qgaSocket')].sort((a, b) => b.length - a.length)[0]!;
    if (Buffer.byteLength(longestSocket) > SUN_PATH_MAX) {
      const room = SUN_PATH_MAX - (Buffer.byteLength(longestSocket) - Buffer.byteLength(config.vmRoot));
      throw new RangeError(`vmRoot is too long: its workloads' socket paths would exceed ${SUN_PATH_MAX} bytes (keep drivers.kvm.vmRoot at most ${room} bytes)`);
    }
    this.ports = new PortAllocator(config.bindAddress, config.portRange.from, config.portRange.to);
    this.slots = config.network === 'tap' ? new SlotAllocator(tapNetworkOf(config)) : undefined;
    this.overlays = new OverlayTemplates(config, config.overlayTemplateDir);
    this.warm = new KvmWarmPool(this.warmPoolHost());
  }

  vmName(id: string): string {
    return `${this.config.namePrefix}${id}`;
  }

  workloadDir(id: string): string {
    assertId(id);
    return path.join(this.config.vmRoot, id);
  }

  private resolvedAccel(): Promise<'kvm' | 'tcg'> {
    this.accel ??= resolveAccel(this.config.accel, this.logger, '/dev/kvm', this.config.qemuBinary);
    return this.accel;
  }

  private withLock<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(id) ?? Promise.resolve();
    const run = prev.then(fn, fn);
    const settled = run.then(() => undefined, () => undefined);
    this.locks.set(id, settled);
    void settled.then(() => {
      if (this.locks.get(id) === settled) this.locks.delete(id);
    });
    return run;
  }

  create(spec: WorkloadSpec): Promise<WorkloadHandle> {
    try {
      assertId(spec.id);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.withLock(spec.id, () => this.createLocked(spec));
  }

  /** What the warm pool may use of this driver. */
  private warmPoolHost(): WarmPoolHost<VmMeta> {
    return {
      createIdle: (spec) => {
        try {
          assertId(spec.id);
        } catch (err) {
          return Promise.reject(err);
        }
        return this.withLock(spec.id, () => this.createLocked({ ...spec, hostname: spec.id, idle: true }));
      },
      waitReady: (id, opts) => this.waitReady(id, opts),
      exclusive: (id, fn) => this.withLock(id, fn),
      workloadDir: (id) => this.workloadDir(id),
      readMeta: (id) => this.readMeta(id),
      isRunning: async (id) => (await this.inspect(id)).state === 'running',
      readConsole: (id) => this.readConsole(id),
      hasher: this.hasher,
      logger: this.logger,
    };
  }

  private async createLocked(spec: LaunchSpec): Promise<WorkloadHandle> {
    const { config, logger } = this;
    const id = spec.id;
    const name = this.vmName(id);
    const dir = this.workloadDir(id);
    const log = logger.child({ workloadId: id });
    const t0 = Date.now();
    let dirCreated = false;
    let port: number | undefined;
    let pid: number | undefined;
    let slot: TapSlot | undefined;

    try {
      await mkdir(config.vmRoot, { recursive: true, mode: 0o700 });
      try {
        await mkdir(dir, { mode: 0o700 });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
          throw new DriverError('internal', `workload directory already exists: ${id}`);
        }
        throw err;
      }
      dirCreated = true;
      // mkdir's mode is filtered by the umask; make it exactly 0700.
      await chmod(dir, 0o700);

      // The seed (password hash + ISO) is written while the overlay is copied
      // and qemu initialises: qemu starts paused without it, and gets it over
      // QMP once both are done. Both branches are awaited before anything
      // else, so a failure of either leaves no step running when the cleanup
      // below removes the directory; `launched` says what the cleanup must free.
      const uuid = randomUUID();
      const readyToken = randomBytes(12).toString('base64url');
      const launched: { port?: number; pid?: number } = {};
      // The seed carries the slot's addresses, so the slot is taken before both.
      slot = await this.allocateSlot();
      const seed = this.writeSeed(dir, spec, { readyToken, instanceId: `${id}-${uuid}`, slot }, log);
      const launch = (async () => {
        const overlayStart = Date.now();
        await this.createOverlay(dir, spec.diskGb);
        log.info({ phase: 'overlay', ms: Date.now() - overlayStart }, 'disk overlay created');
        await this.launch({ dir, name, uuid, readyToken, spec, log, slot }, launched);
      })();
      const [seedDone, launchDone] = await Promise.allSettled([seed, launch]);
      port = launched.port;
      pid = launched.pid;
      if (launchDone.status === 'rejected') throw launchDone.reason;
      if (seedDone.status === 'rejected') throw seedDone.reason;
      if (pid === undefined || port === undefined) throw new DriverError('internal', 'qemu launch left no pid');

      const t = Date.now();
      try {
        await runQmp(vmFile(dir, 'qmpSocket'), attachSeedAndStart(dir), config.pidfileTimeoutMs);
      } catch (err) {
        throw new DriverError('launch_failed', 'could not attach the seed and start the VM', errText(err));
      }
      log.info({ phase: 'start', ms: Date.now() - t, pid, sshPort: port, totalMs: Date.now() - t0 }, 'workload started');
      return { id, pid, sshPort: port, dir };
    } catch (err) {
      // Release everything taken so far, in reverse order, then reject.
      if (dirCreated) {
        try {
          await this.killByName(name, dir, pid);
        } catch (killErr) {
          log.error({ err: killErr }, 'could not stop qemu while cleaning up a failed create');
        }
        await rm(dir, { recursive: true, force: true }).catch((rmErr: unknown) =>
          log.error({ err: rmErr }, 'could not remove workload directory after a failed create'));
      }
      if (slot !== undefined) this.slots?.release(slot.index);
      else if (port !== undefined) this.ports.release(port);
      const derr = err instanceof DriverError ? err : new DriverError('internal', errText(err));
      log.warn({ code: derr.code, detail: derr.detail, ms: Date.now() - t0 }, `create failed: ${derr.message}`);
      throw derr;
    }
  }

  /** Hash the password, write the NoCloud seed ISO. The plaintext lives only in `spec`; from here on only its hash exists. */
  private async writeSeed(
    dir: string,
    spec: LaunchSpec,
    ids: { readyToken: string; instanceId: string; slot?: TapSlot },
    log: Logger,
  ): Promise<void> {
    const { slot } = ids;
    const seedStart = Date.now();
    const common = {
      hostname: spec.hostname,
      finalMessageToken: ids.readyToken,
      instanceId: ids.instanceId,
      network: slot && {
        mac: slot.mac,
        address: `${slot.guestAddress}/${slot.prefixLength}`,
        gateway: slot.hostAddress,
        dns: this.config.tap!.dnsResolver,
      },
    };
    // An idle VM gets no password and no keys: root stays locked until its hand-off.
    const files = isIdle(spec)
      ? buildIdleCloudConfig(common)
      : buildCloudConfig({ ...common, passwordHash: await this.hasher.hash(spec.rootPassword), sshKeys: spec.sshKeys });
    try {
      await writeSeedIso({ dir, isoTool: this.config.isoTool, files, output: vmFile(dir, 'seed') });
    } catch (err) {
      throw new DriverError('internal', 'seed ISO creation failed', tail(errText(err)));
    }
    log.info({ phase: 'seed', ms: Date.now() - seedStart }, 'seed ISO written');
  }

  /**
   * Take a port and start qemu paused on it (retrying the next port when the
   * forward cannot bind), wait for its pidfile and check the pid is this VM.
   * Records the port and pid in `taken` as soon as they are held, for the
   * caller's cleanup.
   */
  private async launch(
    vm: { dir: string; name: string; uuid: string; readyToken: string; spec: LaunchSpec; log: Logger; slot?: TapSlot },
    taken: { port?: number; pid?: number },
  ): Promise<void> {
    const { config } = this;
    const { dir, name, uuid, readyToken, spec, log, slot } = vm;
    const accel = await this.resolvedAccel();
    const tried = new Set<number>();
    /** The pid the early pass already lowered, if any. */
    let loweredEarly: number | undefined;
    for (let attempt = 1; ; attempt++) {
      // A slot's port is forwarded by nftables, not bound by qemu: nothing to try.
      const port = slot ? slot.port : await this.ports.allocate(tried);
      if (port === undefined) throw new DriverError('capacity', 'no free SSH port in the configured range');
      taken.port = port;
      tried.add(port);
      const meta: VmMeta = { id: spec.id, name, uuid, sshPort: port, ...(slot ? { slot: slot.index } : {}), createdAt: new Date().toISOString(), readyToken, ...(isIdle(spec) ? { warm: 'idle' as const } : {}) };
      await writeFile(vmFile(dir, 'meta'), `${JSON.stringify(meta, null, 2)}\n`, { mode: 0o600 });

      if (this.network === 'passt' && (await this.startPasst(dir, port, log)) === 'port-taken') {
        if (attempt >= PORT_TRIES) throw new DriverError('launch_failed', `passt could not bind SSH port ${port}`);
        log.warn({ sshPort: port, attempt }, 'ssh port taken by another process, trying the next one');
        this.ports.release(port);
        taken.port = undefined;
        continue;
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
        network: this.network,
        tap: slot && { device: slot.tap, mac: slot.mac },
        guestAgent: isIdle(spec),
      });
      const t = Date.now();
      const launcher = execa(config.qemuBinary, argv, {
        stdin: 'ignore',
        stdout: 'ignore',
        stderr: 'pipe',
        reject: false,
        // The daemonizing parent returns once the VM is set up; bound it anyway.
        timeout: config.pidfileTimeoutMs,
      });
      const early = this.lowerPriorityWhileLaunching(dir, name, launcher, log);
      const res = await launcher;
      loweredEarly = await early;
      log.info({ phase: 'qemu', ms: Date.now() - t, exitCode: res.exitCode, sshPort: port }, 'qemu launcher returned');
      if (res.exitCode === 0) break;

      const stderr = tail(res.stderr as string | undefined);
      if (!slot && stderr.includes(HOSTFWD_TAKEN) && attempt < PORT_TRIES) {
        // The parent failed, but a child may exist: stop it before the next try.
        // (On the throws below, createLocked's cleanup stops it.)
        await this.killByName(name, dir);
        log.warn({ sshPort: port, attempt }, 'ssh port taken by another process, trying the next one');
        this.ports.release(port);
        taken.port = undefined;
        continue;
      }
      if (res.timedOut) throw new DriverError('timeout', 'qemu did not daemonize in time', stderr);
      if (res.failed && res.exitCode === undefined) {
        throw new DriverError('launch_failed', `qemu could not be started: ${res.shortMessage ?? 'unknown error'}`, stderr);
      }
      throw new DriverError('launch_failed', `qemu exited with code ${res.exitCode}`, stderr);
    }

    const t = Date.now();
    const pid = await waitForPidfile(vmFile(dir, 'pidfile'), config.pidfileTimeoutMs);
    if (pid === undefined) throw new DriverError('timeout', 'qemu pidfile did not appear in time');
    taken.pid = pid;
    if (!(await isVmProcess(pid, name))) {
      taken.pid = undefined;
      throw new DriverError('launch_failed', `pid ${pid} from the pidfile is not ${name} (qemu died right after start?)`);
    }
    if (this.guestNice > 0 && loweredEarly !== pid) {
      // The launcher returned before the early pass saw this pid. (Threads made
      // after an early pass inherit its nice value from the thread that made them.)
      const lowered = await lowerProcessPriority(pid, this.guestNice);
      log.debug({ pid, nice: this.guestNice, ...lowered }, 'guest CPU priority lowered');
    }
    if (config.guestOomScoreAdj !== undefined) {
      // Best effort: a host that refuses it still runs the VM, only without the OOM preference.
      await setOomScoreAdj(pid, config.guestOomScoreAdj).catch((err: Error) =>
        log.warn({ pid, oomScoreAdj: config.guestOomScoreAdj, err: err.message }, 'could not set the guest OOM score'),
      );
    }
    log.info({ phase: 'pidfile', ms: Date.now() - t, pid, sshPort: taken.port }, 'qemu running, paused');
  }

  private async createOverlay(dir: string, diskGb: number): Promise<void> {
    if (!Number.isInteger(diskGb) || diskGb <= 0) throw new DriverError('internal', 'diskGb must be a positive integer');
    try {
      await this.overlays.create(vmFile(dir, 'disk'), diskGb);
    } catch (err) {
      throw new DriverError('internal', 'disk overlay creation failed', tail(err instanceof OverlayError ? err.detail : errText(err)));
    }
  }

  /** Stop whatever qemu runs for this VM: the pidfile's pid (if it is ours) and any other process naming it. */
  private async killByName(name: string, dir: string, knownPid?: number): Promise<void> {
    const pids = new Set<number>();
    if (knownPid !== undefined) pids.add(knownPid);
    const fromFile = await readPidfile(vmFile(dir, 'pidfile'));
    if (fromFile !== undefined) pids.add(fromFile);
    // One pass over /proc finds both this VM's qemu and its passt.
    const procs = await listProcesses();
    for (const p of procs) if (argvHasVmName(p.argv, name)) pids.add(p.pid);
    for (const p of pids) await stopVmProcess(p, name, this.config.stopTimeoutMs);
    // Whatever the configured mode is now: the VM may date from another one.
    await stopPasst(vmFile(dir, 'passtSocket'), vmFile(dir, 'passtPidfile'), this.config.stopTimeoutMs, procs);
  }

  private get guestNice(): number {
    return this.config.guestNice ?? 0;
  }

  /**
   * Lower the new qemu's priority as soon as its pidfile names it, while the
   * launcher still runs: the daemonized child is already in its own session
   * (autogroup) at full weight and its vCPU starts spinning before the parent
   * returns, which under a burst starves the agent's next spawns. Polls finely
   * (a launch takes ~60 ms); best effort, the caller checks identity again.
   * Returns the pid it lowered, if it got to one.
   */
  private async lowerPriorityWhileLaunching(dir: string, name: string, launch: Promise<unknown>, log: Logger): Promise<number | undefined> {
    if (this.guestNice <= 0) return undefined;
    let settled = false;
    void launch.finally(() => {
      settled = true;
    });
    const pidfile = vmFile(dir, 'pidfile');
    while (!settled) {
      const pid = await readPidfile(pidfile);
      if (pid !== undefined && (await isVmProcess(pid, name))) {
        try {
          const lowered = await lowerProcessPriority(pid, this.guestNice);
          log.debug({ pid, nice: this.guestNice, ...lowered }, 'guest CPU priority lowered during launch');
          return pid;
        } catch (err) {
          log.debug({ err }, 'could not lower guest priority during launch');
          return undefined;
        }
      }
      await new Promise((r) => setTimeout(r, 5));
    }
    return undefined;
  }

  private get network(): 'restricted' | 'user' | 'passt' | 'tap' {
    return this.config.network ?? 'restricted';
  }

  /** In `tap` mode a free slot (or a capacity error); otherwise undefined. */
  private async allocateSlot(): Promise<TapSlot | undefined> {
    if (!this.slots) return undefined;
    const recorded = new Set<number>();
    for (const id of await this.list()) {
      const meta = await this.readMeta(id);
      if (meta?.slot !== undefined) recorded.add(meta.slot);
    }
    const slot = this.slots.allocate(recorded);
    if (!slot) throw new DriverError('capacity', 'no free guest network slot (drivers.kvm.tap.slots)');
    return slot;
  }

  /**
   * Start this VM's passt (it daemonizes once its socket and the SSH port are
   * bound) and check the pidfile names it. 'port-taken' when the SSH port is
   * held by someone else; the caller tries the next one.
   */
  private async startPasst(dir: string, port: number, log: Logger): Promise<'ok' | 'port-taken'> {
    const socket = vmFile(dir, 'passtSocket');
    const pidfile = vmFile(dir, 'passtPidfile');
    // Leftovers of a previous attempt (its passt is already stopped) would be mistaken for this one's.
    await rm(socket, { force: true });
    await rm(pidfile, { force: true });
    const uid = process.getuid?.();
    const gid = process.getgid?.();
    const argv = buildPasstArgv({
      socket,
      pidfile,
      logFile: vmFile(dir, 'passtLog'),
      bindAddress: this.config.bindAddress,
      sshPort: port,
      runAs: uid === 0 && gid !== undefined ? { uid, gid } : undefined,
    });
    const t = Date.now();
    const res = await execa(this.config.passtBinary ?? 'passt', argv, {
      stdin: 'ignore',
      stdout: 'ignore',
      stderr: 'pipe',
      reject: false,
      timeout: this.config.pidfileTimeoutMs,
    });
    log.info({ phase: 'passt', ms: Date.now() - t, exitCode: res.exitCode, sshPort: port }, 'passt launcher returned');
    if (res.exitCode !== 0) {
      await stopPasst(socket, pidfile, this.config.stopTimeoutMs);
      const stderr = tail(res.stderr as string | undefined);
      if (stderr.includes(PASST_PORT_TAKEN)) return 'port-taken';
      if (res.timedOut) throw new DriverError('timeout', 'passt did not start in time', stderr);
      throw new DriverError('launch_failed', `passt could not be started: ${res.shortMessage ?? `exit code ${res.exitCode}`}`, stderr);
    }
    const pid = await waitForPidfile(pidfile, this.config.pidfileTimeoutMs);
    if (pid === undefined || !(await isPasstProcess(pid, socket))) {
      await stopPasst(socket, pidfile, this.config.stopTimeoutMs);
      throw new DriverError('launch_failed', 'passt did not stay up (no pidfile or wrong process)');
    }
    return 'ok';
  }

  /** Let go of helper processes; workloads keep running. */
  close(): void {
    this.hasher.close();
  }

  destroy(id: string): Promise<void> {
    try {
      assertId(id);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.withLock(id, () => this.destroyLocked(id));
  }

  private async destroyLocked(id: string): Promise<void> {
    const dir = this.workloadDir(id);
    const name = this.vmName(id);
    const log = this.logger.child({ workloadId: id });
    const t0 = Date.now();
    const meta = await this.readMeta(id);
    const existed = await stat(dir).then(() => true, () => false);
    try {
      // Also when the directory is gone: a qemu may outlive a half-finished cleanup.
      await this.killByName(name, dir);
    } catch (err) {
      throw new DriverError('internal', `could not stop ${name}`, errText(err));
    }
    await rm(dir, { recursive: true, force: true });
    this.consoles.delete(id);
    this.warm.forget(id);
    if (meta?.slot !== undefined) this.slots?.release(meta.slot);
    else if (meta) this.ports.release(meta.sshPort);
    if (existed) log.info({ phase: 'destroy', ms: Date.now() - t0 }, 'workload destroyed');
    else log.debug('destroy: no such workload, nothing to do');
  }

  async inspect(id: string): Promise<WorkloadInspection> {
    assertId(id);
    const meta = await this.readMeta(id);
    const name = this.vmName(id);
    const pid = await readPidfile(vmFile(this.workloadDir(id), 'pidfile'));
    // isVmProcess is false for a zombie too (its cmdline is empty).
    const running = pid !== undefined && (await isVmProcess(pid, name));
    if (running) return { id, state: 'running', pid, sshPort: meta?.sshPort };
    return meta ? { id, state: 'gone', sshPort: meta.sshPort } : { id, state: 'gone' };
  }

  /**
   * Free bytes under the VM root and what the given workloads' overlays
   * already take on it. Synchronous (statfs + one stat per workload): admission
   * decides in one turn of the event loop. Throws if the VM root's disk cannot be read.
   */
  diskReading(ids: readonly string[]): { freeBytes: number; allocatedBytes: number } {
    const freeBytes = freeBytesUnder(this.config.vmRoot);
    let allocatedBytes = 0;
    for (const id of ids) {
      if (!ID_RE.test(id)) continue;
      try {
        allocatedBytes += statSync(vmFile(this.workloadDir(id), 'disk')).blocks * 512;
      } catch {
        // no overlay (yet, or any more): it takes nothing
      }
    }
    return { freeBytes, allocatedBytes };
  }

  async list(): Promise<string[]> {
    let entries: string[];
    try {
      entries = await readdir(this.config.vmRoot);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    const ids: string[] = [];
    for (const e of entries) {
      if (!ID_RE.test(e)) continue;
      const s = await stat(path.join(this.config.vmRoot, e)).catch(() => undefined);
      if (s?.isDirectory()) ids.push(e);
    }
    return ids.sort();
  }

  /** vm.json of a workload, or undefined when missing or unreadable. */
  async readMeta(id: string): Promise<VmMeta | undefined> {
    try {
      const m = JSON.parse(await readFile(vmFile(this.workloadDir(id), 'meta'), 'utf8')) as VmMeta;
      return typeof m.sshPort === 'number' && typeof m.name === 'string' ? m : undefined;
    } catch {
      return undefined;
    }
  }

  async waitReady(id: string, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<ReadyResult> {
    const t0 = Date.now();
    const dir = this.workloadDir(id);
    // vm.json is written once at launch: port and token are read once, not per poll.
    const meta = await this.readMeta(id);
    const needCloudInit = this.config.readiness === 'cloud-init';
    let banner = false;
    const failed = async (reason: 'died' | 'timeout'): Promise<ReadyResult> => ({
      ready: false,
      reason,
      ms: Date.now() - t0,
      // A dead qemu's ring is gone: the tail is what the last polls drained.
      consoleTail: consoleTail(await this.readConsole(id)),
    });
    try {
      if (!meta) return await failed('died');
      // A tap guest is probed on its own address: the host routes to it directly.
      const tapSlot = meta.slot !== undefined && this.slots ? this.slots.slot(meta.slot) : undefined;
      const host = tapSlot ? tapSlot.guestAddress : probeHost(this.config.bindAddress);
      const sshPort = tapSlot ? 22 : meta.sshPort;
      const name = this.vmName(id);
      for (;;) {
        const pid = await readPidfile(vmFile(dir, 'pidfile'));
        if (pid === undefined || !(await isVmProcess(pid, name))) return await failed('died');
        // Drained at every poll, whatever the readiness mode: the boot_failed
        // tail needs it, and the ring must not overwrite cloud-init's final message.
        const console = await this.readConsole(id);
        // The banner is cheap to keep probing until it first answers; after that
        // only the console marker is awaited.
        banner ||= await probeSshBanner(host, sshPort, 2000);
        if (banner && (!needCloudInit || console.includes(finalMessageFor(meta.readyToken)))) {
          return { ready: true, ms: Date.now() - t0 };
        }
        if (Date.now() - t0 >= opts.timeoutMs || opts.signal?.aborted) return await failed('timeout');
        // A boot takes seconds to minutes: a half-second poll costs nothing and
        // reacts to a dead qemu at once.
        await new Promise((r) => setTimeout(r, 500));
      }
    } finally {
      // Nobody reads this console any more: qemu's ring bounds it from here on.
      this.consoles.delete(id);
    }
  }

  /**
   * Whether cloud-init has printed this workload's final message on the serial
   * console: the point where the root password is set and sshd configured.
   * An SSH banner alone comes ~10 s earlier.
   */
  async cloudInitFinished(id: string): Promise<boolean> {
    const meta = await this.readMeta(id);
    return meta !== undefined && (await this.readConsole(id)).includes(finalMessageFor(meta.readyToken));
  }

  /**
   * The workload's console as far as it is kept: drains what qemu's ring holds
   * into serial.log (at most `consoleLogBytes`, oldest dropped first) and
   * returns the kept text. A VM started before the console became a ring (a
   * file chardev) has no ring to read: its serial.log is read as it is.
   */
  readConsole(id: string): Promise<string> {
    assertId(id);
    const prev = this.consoleReads.get(id) ?? Promise.resolve('');
    const next = prev.catch(() => '').then(() => this.drainConsole(id));
    this.consoleReads.set(id, next);
    void next.finally(() => {
      if (this.consoleReads.get(id) === next) this.consoleReads.delete(id);
    });
    return next;
  }

  private async drainConsole(id: string): Promise<string> {
    const dir = this.workloadDir(id);
    const file = vmFile(dir, 'serialLog');
    const cap = this.config.consoleLogBytes ?? DEFAULT_CONSOLE_LOG_BYTES;
    let kept = this.consoles.get(id);
    if (!kept) {
      kept = { text: await readTail(file, cap), dirty: false };
      this.consoles.set(id, kept);
    }
    let chunk: Buffer;
    try {
      const [ret] = await runQmp(vmFile(dir, 'qmpSocket'), readConsoleRing(), 2000);
      chunk = Buffer.from(typeof ret === 'string' ? ret : '', 'base64');
    } catch (err) {
      // qemu gone (its ring with it) or no ring (an older VM): what is kept is all there is.
      this.logger.debug({ workloadId: id, err: (err as Error).message }, 'console ring not read');
      return kept.text.toString('utf8');
    }
    if (chunk.length === 0 && !kept.dirty) return kept.text.toString('utf8');
    let text = Buffer.concat([kept.text, chunk]);
    // Past the cap, keep the newer half: the file is rewritten once per half a cap of output, not at every read.
    const rewrite = kept.dirty || text.length > cap;
    if (text.length > cap) text = text.subarray(text.length - Math.floor(cap / 2));
    kept.text = text;
    try {
      if (rewrite) await writeFile(file, text, { mode: 0o600 });
      else await appendFile(file, chunk, { mode: 0o600 });
      kept.dirty = false;
    } catch (err) {
      // A full disk: the text stays in memory, and the file is rewritten whole once it can be.
      kept.dirty = true;
      this.logger.debug({ workloadId: id, code: (err as NodeJS.ErrnoException).code }, 'console log not written');
    }
    return text.toString('utf8');
  }
}

/** The last `max` bytes of a file, or nothing. */
async function readTail(file: string, max: number): Promise<Buffer> {
  try {
    const buf = await readFile(file);
    return buf.length > max ? buf.subarray(buf.length - max) : buf;
  } catch {
    return Buffer.alloc(0);
  }
}

function assertId(id: string): void {
  // The id becomes a path component and part of qemu's -name: keep it boring.
  if (!ID_RE.test(id)) throw new DriverError('internal', 'invalid workload id');
}

function errText(err: unknown): string {
  if (err && typeof err === 'object') {
    const e = err as { stderr?: unknown; shortMessage?: unknown; message?: unknown };
    if (typeof e.stderr === 'string' && e.stderr.trim()) return e.stderr;
    if (typeof e.shortMessage === 'string') return e.shortMessage;
    if (typeof e.message === 'string') return e.message;
  }
  return String(err);
}
