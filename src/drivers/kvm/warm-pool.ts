/**
 * The KVM driver's warm-pool side (`KvmDriver.warm`): idle VMs booted ahead of
 * demand with a guest-agent channel, waited on until that agent answers, and
 * handed to a tenant once (handoff.ts), after which the channel is gone.
 *
 * vm.json's `warm` field is the record: `idle` from creation, `handed-off`
 * from the moment a hand-off starts (before the first byte goes to the
 * guest), so a VM is never handed to a second tenant, not even across an
 * agent restart.
 */
import { rm } from 'node:fs/promises';
import type { Logger } from '../../util/logger.js';
import type { PasswordHasher } from '../../util/password-hasher.js';
import { DriverError, type IdleSpec, type ReadyResult, type TenantSpec, type WarmPoolSupport, type WorkloadHandle } from '../types.js';
import { vmFile } from './workload-files.js';
import { writeVmMeta, type VmMeta } from './vm-meta.js';
import { ping, isEmptyReturn } from './guest-agent-protocol.js';
import { GuestAgentError, GuestAgentSession } from './guest-agent.js';
import { checkTenantAccess, configureTenant, removeGuestAgentPort, type HandOffTimings } from './handoff.js';
import { notReady } from './readiness.js';

/** What the pool needs from the driver; the driver passes closures over its own internals. */
export interface WarmPoolHost {
  /** The driver's create path for an idle VM (its lock held, its cleanup on failure). */
  createIdle(spec: IdleSpec): Promise<WorkloadHandle>;
  waitReady(id: string, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<ReadyResult>;
  /** Run `fn` while no create/destroy of the same id runs. */
  exclusive<T>(id: string, fn: () => Promise<T>): Promise<T>;
  workloadDir(id: string): string;
  readMeta(id: string): Promise<VmMeta | undefined>;
  isRunning(id: string): Promise<boolean>;
  readConsole(id: string): Promise<string>;
  hasher: PasswordHasher;
  logger: Logger;
}

/** Between attempts to reach a guest agent that is not up yet. */
const IDLE_POLL_MS = 500;
/** One sync attempt while waiting for an idle VM; qemu-ga answers in milliseconds once it runs. */
const IDLE_SYNC_TIMEOUT_MS = 5_000;
/** Removing the channel over QMP is qemu's work, not the guest's: quick, but bounded. */
const CHANNEL_CLOSE_TIMEOUT_MS = 3_000;

export class KvmWarmPool implements WarmPoolSupport {
  /** Sync ids sent per VM, so that a late answer to one of our own timed-out syncs is not taken for a lie. */
  private readonly syncIds = new Map<string, Set<number>>();

  constructor(private readonly host: WarmPoolHost) {}

  createIdle(spec: IdleSpec): Promise<WorkloadHandle> {
    return this.host.createIdle(spec);
  }

  async waitIdle(id: string, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<ReadyResult> {
    const { host } = this;
    const t0 = Date.now();
    const meta = await host.readMeta(id);
    if (meta?.warm !== 'idle') throw new DriverError('internal', `${id} is not an idle pool VM`);
    const booted = await host.waitReady(id, opts);
    if (!booted.ready) return booted;
    const failed = (reason: 'died' | 'timeout'): Promise<ReadyResult> => notReady(reason, t0, () => host.readConsole(id));
    const socket = vmFile(host.workloadDir(id), 'qgaSocket');
    for (;;) {
      if (!(await host.isRunning(id))) return failed('died');
      const left = opts.timeoutMs - (Date.now() - t0);
      if (left <= 0 || opts.signal?.aborted) return failed('timeout');
      let session: GuestAgentSession | undefined;
      try {
        session = await GuestAgentSession.open(socket, { connectTimeoutMs: Math.min(left, IDLE_SYNC_TIMEOUT_MS), signal: opts.signal });
        await session.sync(Math.min(left, IDLE_SYNC_TIMEOUT_MS), this.idsOf(id));
        if (isEmptyReturn(await session.call(ping(), Math.min(left, IDLE_SYNC_TIMEOUT_MS)))) return { ready: true, ms: Date.now() - t0 };
      } catch (err) {
        host.logger.debug({ workloadId: id, reason: err instanceof GuestAgentError ? err.reason : 'error' }, 'guest agent not answering yet');
      } finally {
        session?.close();
      }
      await new Promise((r) => setTimeout(r, IDLE_POLL_MS));
    }
  }

  handOff(id: string, tenant: TenantSpec, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<void> {
    let dir: string;
    try {
      dir = this.host.workloadDir(id);
    } catch {
      return Promise.reject(new DriverError('handoff_failed', 'invalid workload id'));
    }
    // Resolves the moment login is open; the lock is held until qemu has let
    // go of the channel too, so a destroy right after waits for that.
    return new Promise<void>((resolve, reject) => {
      this.host.exclusive(id, () => this.handOffLocked(id, dir, tenant, opts, resolve)).then(resolve, reject);
    });
  }

  /** Drop what is kept about a VM (the driver calls this when it destroys one). */
  forget(id: string): void {
    this.syncIds.delete(id);
  }

  private async handOffLocked(
    id: string,
    dir: string,
    tenant: TenantSpec,
    opts: { timeoutMs: number; signal?: AbortSignal },
    loginOpen: () => void,
  ): Promise<void> {
    const { host } = this;
    const log = host.logger.child({ workloadId: id });
    const t0 = performance.now();
    const deadline = Date.now() + opts.timeoutMs;
    const meta = await host.readMeta(id);
    if (meta?.warm !== 'idle') {
      throw new DriverError('handoff_failed', meta?.warm === 'handed-off' ? 'this VM was handed off before' : 'not an idle pool VM');
    }
    if (opts.signal?.aborted) throw new DriverError('handoff_failed', 'aborted');
    try {
      checkTenantAccess(tenant);
    } catch (err) {
      // The caller's bug, not the VM's: it stays idle for the next hand-off.
      throw new DriverError('handoff_failed', (err as Error).message);
    }
    if (!(await host.isRunning(id))) throw new DriverError('handoff_failed', 'the VM is not running');
    // Recorded before the guest hears anything: whatever happens next, this VM is never offered again.
    await writeVmMeta(dir, { ...meta, warm: 'handed-off' });

    const timings: HandOffTimings = {};
    const hashing = host.hasher.hash(tenant.rootPassword);
    hashing.catch(() => undefined);
    let session: GuestAgentSession | undefined;
    let failure: DriverError | undefined;
    try {
      session = await GuestAgentSession.open(vmFile(dir, 'qgaSocket'), { connectTimeoutMs: Math.max(1, deadline - Date.now()), signal: opts.signal });
      const passwordHash = await hashing;
      await configureTenant(session, { hostname: tenant.hostname, passwordHash, sshKeys: tenant.sshKeys }, { deadline, earlierSyncIds: this.idsOf(id) }, timings);
    } catch (err) {
      // A RangeError is the caller's value refused before anything was sent; its message holds no guest text.
      failure = new DriverError('handoff_failed', err instanceof GuestAgentError || err instanceof RangeError ? err.message : 'hand-off failed');
      log.warn({ reason: err instanceof GuestAgentError ? err.reason : undefined, ms: Math.round(performance.now() - t0) }, `hand-off failed: ${failure.message}`);
    } finally {
      session?.close();
      this.syncIds.delete(id);
    }
    // Nothing is read from the guest agent any more, and with the socket file
    // gone nobody can connect to it: the tenant may be told now.
    await rm(vmFile(dir, 'qgaSocket'), { force: true });
    if (!failure) {
      log.info({ phase: 'handoff', ms: Math.round(performance.now() - t0), steps: timings }, 'VM handed off');
      loginOpen();
    }
    const tClose = performance.now();
    // qemu keeping the port is worth a warning, not a failure: its socket is unlinked.
    if (!(await removeGuestAgentPort(vmFile(dir, 'qmpSocket'), CHANNEL_CLOSE_TIMEOUT_MS))) log.warn('guest-agent port not removed from qemu (its socket is unlinked)');
    else log.debug({ ms: Math.round(performance.now() - tClose) }, 'guest-agent port removed from qemu');
    if (failure) throw failure;
  }

  private idsOf(id: string): Set<number> {
    let ids = this.syncIds.get(id);
    if (!ids) this.syncIds.set(id, (ids = new Set()));
    return ids;
  }
}
