/**
 * KvmDriver: creates, destroys, inspects and lists workloads, one qemu each.
 * A create makes the workload's directory and takes a tap slot, then copies
 * the disk overlay and launches qemu paused (launch.ts) while beside it the
 * password is hashed and the seed ISO written; QMP then attaches the seed and
 * starts the VM. Each resource a create takes registers its undo the moment
 * it is taken (util/revert.ts). docs/driver.md shows the whole picture.
 *
 * Slightly over the house's ~350 lines: create's order of steps and the warm
 * pool's entry points read the same per-workload lock and directory.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { statSync } from 'node:fs';
import { chmod, mkdir, readdir, rm, stat } from 'node:fs/promises';
import path from 'node:path';
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
import { attachSeedAndStart } from './argv.js';
import { readVmMeta, type VmMeta } from './vm-meta.js';
import { assertSocketPathsFit, isWorkloadId, vmFile, workloadDir } from './workload-files.js';
import { buildCloudConfig, buildIdleCloudConfig, finalMessageFor } from './cloud-config.js';
import { tapNetworkOf, type KvmDriverConfig } from './config.js';
import { PortAllocator } from './ports.js';
import { SlotAllocator } from './slots.js';
import type { TapSlot } from '../../hostnet/plan.js';
import { isVmProcess, outputTail, readPidfile } from './process.js';
import { OverlayError, OverlayTemplates } from './overlay.js';
import { freeBytesUnder } from '../../util/free-space.js';
import { Reverter } from '../../util/revert.js';
import { launchVm, stopVm } from './launch.js';
import { runQmp } from './qmp.js';
import { writeSeedIso } from './seed.js';
import { notReady, probeHost, waitUntilReady } from './readiness.js';
import { ConsoleLogs, DEFAULT_CONSOLE_LOG_BYTES } from './console-log.js';
import { KvmWarmPool, type WarmPoolHost } from './warm-pool.js';

/** An idle warm-pool VM as the create path sees it: no tenant yet, its id for a hostname. */
type IdleLaunch = IdleSpec & { hostname: string; idle: true };
type LaunchSpec = WorkloadSpec | IdleLaunch;

function isIdle(spec: LaunchSpec): spec is IdleLaunch {
  return 'idle' in spec;
}

export class KvmDriver implements ComputeDriver {
  readonly kind = 'kvm';
  private readonly ports: PortAllocator;
  /** In `tap` mode: the slot pool; the slot's port replaces the port allocator's. */
  private readonly slots: SlotAllocator | undefined;
  private readonly overlays: OverlayTemplates;
  private accel: Promise<'kvm' | 'tcg'> | undefined;
  private readonly consoles: ConsoleLogs;
  /** Serialises create/destroy per id so a destroy never races a half-done create. */
  private readonly locks = new Map<string, Promise<unknown>>();
  /** Booting idle VMs ahead of demand and handing them to tenants (warm-pool.ts). */
  readonly warm: KvmWarmPool;

  constructor(
    private readonly config: KvmDriverConfig,
    private readonly logger: Logger,
    private readonly hasher: PasswordHasher = new LibcryptHasher({ logger }),
  ) {
    if (!path.isAbsolute(config.vmRoot)) throw new RangeError('vmRoot must be an absolute path');
    if (!path.isAbsolute(config.baseImage)) throw new RangeError('baseImage must be an absolute path');
    // The workloads' sockets live in their folders, under vmRoot.
    assertSocketPathsFit(config.vmRoot);
    this.ports = new PortAllocator(config.bindAddress, config.portRange.from, config.portRange.to);
    this.slots = config.network === 'tap' ? new SlotAllocator(tapNetworkOf(config)) : undefined;
    this.overlays = new OverlayTemplates(config, config.overlayTemplateDir);
    this.consoles = new ConsoleLogs(config.consoleLogBytes ?? DEFAULT_CONSOLE_LOG_BYTES, logger);
    this.warm = new KvmWarmPool(this.warmPoolHost());
  }

  vmName(id: string): string {
    return `${this.config.namePrefix}${id}`;
  }

  workloadDir(id: string): string {
    assertId(id);
    return workloadDir(this.config.vmRoot, id);
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
  private warmPoolHost(): WarmPoolHost {
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
      isRunning: async (id) => (await this.runningPid(id)) !== undefined,
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
    const revert = new Reverter((err) => log.error({ err }, 'a cleanup step after a failed create failed'));

    try {
      await this.makeWorkloadDir(dir, id, revert);
      // The seed carries the slot's addresses, so the slot is taken before both branches below.
      const slot = await this.allocateSlot();
      if (slot) revert.add(() => this.slots!.release(slot.index));

      // The seed (password hash + ISO) is written while the overlay is copied
      // and qemu initialises: qemu starts paused without it, and gets it over
      // QMP once both are done. Both branches are awaited before anything
      // else, so a failure of either leaves no step running when the undos run.
      const uuid = randomUUID();
      const readyToken = randomBytes(12).toString('base64url');
      const seed = this.writeSeed(dir, spec, { readyToken, instanceId: `${id}-${uuid}`, slot }, log);
      const launch = (async () => {
        const overlayStart = Date.now();
        await this.createOverlay(dir, spec.diskGb);
        log.info({ phase: 'overlay', ms: Date.now() - overlayStart }, 'disk overlay created');
        const host = { config, accel: await this.resolvedAccel(), ports: this.ports };
        return launchVm({ dir, name, uuid, readyToken, spec, log, slot, idle: isIdle(spec) }, host, revert);
      })();
      const [seedDone, launchDone] = await Promise.allSettled([seed, launch]);
      if (launchDone.status === 'rejected') throw launchDone.reason;
      if (seedDone.status === 'rejected') throw seedDone.reason;
      const { pid, port } = launchDone.value;

      const t = Date.now();
      try {
        await runQmp(vmFile(dir, 'qmpSocket'), attachSeedAndStart(dir), config.pidfileTimeoutMs);
      } catch (err) {
        throw new DriverError('launch_failed', 'could not attach the seed and start the VM', errText(err));
      }
      log.info({ phase: 'start', ms: Date.now() - t, pid, sshPort: port, totalMs: Date.now() - t0 }, 'workload started');
      revert.success();
      return { id, pid, sshPort: port, dir };
    } catch (err) {
      await revert.fail();
      const derr = err instanceof DriverError ? err : new DriverError('internal', errText(err));
      log.warn({ code: derr.code, detail: derr.detail, ms: Date.now() - t0 }, `create failed: ${derr.message}`);
      throw derr;
    }
  }

  /** The workload's own 0700 folder; refuses one that exists (another workload's, or a leftover). Its removal is registered the moment it exists. */
  private async makeWorkloadDir(dir: string, id: string, revert: Reverter): Promise<void> {
    await mkdir(this.config.vmRoot, { recursive: true, mode: 0o700 });
    try {
      await mkdir(dir, { mode: 0o700 });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
        throw new DriverError('internal', `workload directory already exists: ${id}`);
      }
      throw err;
    }
    revert.add(() => rm(dir, { recursive: true, force: true }));
    // mkdir's mode is filtered by the umask; make it exactly 0700.
    await chmod(dir, 0o700);
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
      throw new DriverError('internal', 'seed ISO creation failed', outputTail(errText(err)));
    }
    log.info({ phase: 'seed', ms: Date.now() - seedStart }, 'seed ISO written');
  }

  private async createOverlay(dir: string, diskGb: number): Promise<void> {
    if (!Number.isInteger(diskGb) || diskGb <= 0) throw new DriverError('internal', 'diskGb must be a positive integer');
    try {
      await this.overlays.create(vmFile(dir, 'disk'), diskGb);
    } catch (err) {
      throw new DriverError('internal', 'disk overlay creation failed', outputTail(err instanceof OverlayError ? err.detail : errText(err)));
    }
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
      await stopVm(name, dir, this.config.stopTimeoutMs);
    } catch (err) {
      throw new DriverError('internal', `could not stop ${name}`, errText(err));
    }
    await rm(dir, { recursive: true, force: true });
    this.consoles.forget(id);
    this.warm.forget(id);
    if (meta?.slot !== undefined) this.slots?.release(meta.slot);
    else if (meta) this.ports.release(meta.sshPort);
    if (existed) log.info({ phase: 'destroy', ms: Date.now() - t0 }, 'workload destroyed');
    else log.debug('destroy: no such workload, nothing to do');
  }

  async inspect(id: string): Promise<WorkloadInspection> {
    assertId(id);
    const meta = await this.readMeta(id);
    const pid = await this.runningPid(id);
    if (pid !== undefined) return { id, state: 'running', pid, sshPort: meta?.sshPort };
    return meta ? { id, state: 'gone', sshPort: meta.sshPort } : { id, state: 'gone' };
  }

  /** qemu's pid while it runs as this workload's VM (not a zombie, not a recycled pid). */
  private async runningPid(id: string): Promise<number | undefined> {
    const pid = await readPidfile(vmFile(this.workloadDir(id), 'pidfile'));
    // isVmProcess is false for a zombie too (its cmdline is empty).
    return pid !== undefined && (await isVmProcess(pid, this.vmName(id))) ? pid : undefined;
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
      if (!isWorkloadId(id)) continue;
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
      if (!isWorkloadId(e)) continue;
      const s = await stat(workloadDir(this.config.vmRoot, e)).catch(() => undefined);
      if (s?.isDirectory()) ids.push(e);
    }
    return ids.sort();
  }

  /** vm.json of a workload, or undefined when missing or unreadable. */
  async readMeta(id: string): Promise<VmMeta | undefined> {
    return readVmMeta(this.workloadDir(id));
  }

  async waitReady(id: string, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<ReadyResult> {
    const t0 = Date.now();
    // vm.json is written once at launch: port and token are read once, not per poll.
    const meta = await this.readMeta(id);
    const readConsole = () => this.readConsole(id);
    try {
      if (!meta) return await notReady('died', t0, readConsole);
      // A tap guest is probed on its own address: the host routes to it directly.
      const tapSlot = meta.slot !== undefined && this.slots ? this.slots.slot(meta.slot) : undefined;
      return await waitUntilReady({
        running: async () => (await this.runningPid(id)) !== undefined,
        readConsole,
        host: tapSlot ? tapSlot.guestAddress : probeHost(this.config.bindAddress),
        port: tapSlot ? 22 : meta.sshPort,
        finalMessage: this.config.readiness === 'cloud-init' ? finalMessageFor(meta.readyToken) : undefined,
      }, opts, t0);
    } finally {
      this.consoles.forget(id);
    }
  }

  /** The console as far as it is kept (console-log.ts); reading drains qemu's ring into serial.log. */
  readConsole(id: string): Promise<string> {
    assertId(id);
    return this.consoles.read(id, this.workloadDir(id));
  }
}

function assertId(id: string): void {
  // The id becomes a path component and part of qemu's -name: keep it boring.
  if (!isWorkloadId(id)) throw new DriverError('internal', 'invalid workload id');
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
