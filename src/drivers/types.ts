/**
 * The contract between the agent and a compute driver.
 *
 * Drivers know nothing of Nostr, consumers or payment: they get a fully
 * validated, agent-generated spec and return where the workload can be reached.
 */

/** What the agent asks a driver to create. Every string here was generated or validated by the agent. */
export interface WorkloadSpec {
  /** Agent-generated id, `[a-z0-9-]{1,40}`; used for the directory, the qemu name and the hostname. */
  id: string;
  /** Guest hostname (agent-generated, same charset as `id`). */
  hostname: string;
  vcpus: number;
  memoryMb: number;
  diskGb: number;
  /** Plaintext root password. Lives in memory only; drivers must never write it to disk, argv or logs. */
  rootPassword: string;
  /** Validated OpenSSH public keys (single line each) to authorise for root. */
  sshKeys: string[];
}

/** A running workload as the driver sees it. */
export interface WorkloadHandle {
  id: string;
  /** Host-side process id (qemu's pid for the KVM driver). */
  pid: number;
  /** Host port forwarded to the guest's SSH port 22. */
  sshPort: number;
  /** Directory that holds everything the workload owns on the host. */
  dir: string;
}

export type WorkloadState = 'running' | 'gone';

export interface WorkloadInspection {
  id: string;
  state: WorkloadState;
  pid?: number;
  sshPort?: number;
}

/** How a boot ended, as far as the consumer's access is concerned. */
export type ReadyResult =
  | { ready: true; ms: number }
  | { ready: false; reason: 'died' | 'timeout'; ms: number; /** last lines of the guest console */ consoleTail: string };

export interface ComputeDriver {
  /** Short name used in config and logs, e.g. `kvm`. */
  readonly kind: string;
  /**
   * Create and start a workload. Resolves once the workload process exists
   * (for KVM: once qemu's pidfile appears). On any failure every resource taken
   * so far (port, directory, process) is released before the promise rejects.
   */
  create(spec: WorkloadSpec): Promise<WorkloadHandle>;
  /** Stop the workload and free everything it holds. Idempotent: destroying a missing workload is not an error. */
  destroy(id: string): Promise<void>;
  /** Current state of one workload. */
  inspect(id: string): Promise<WorkloadInspection>;
  /** Ids of the workloads this driver has on the host (running or half-created). */
  list(): Promise<string[]>;
  /**
   * Wait until the workload accepts the consumer's login, it dies, or
   * `timeoutMs` passes. Resolves early with `died` the moment the process is gone.
   */
  waitReady(id: string, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<ReadyResult>;
  /** Let go of the driver's own helpers at shutdown; workloads keep running. */
  close(): void;
  /** Present when the driver can keep booted, idle VMs to hand to a tenant later (the warm pool). */
  readonly warm?: WarmPoolSupport;
}

/** A warm-pool VM as the agent asks for it: booted and idle, and nobody can log in to it until `handOff`. */
export interface IdleSpec {
  /** Agent-generated id, same rules as `WorkloadSpec.id`. */
  id: string;
  vcpus: number;
  memoryMb: number;
  diskGb: number;
}

/** The tenant's side of a hand-off: the same validated fields a cold spawn gets. */
export interface TenantSpec {
  hostname: string;
  /** Plaintext, in memory only: the driver gives the guest nothing but its SHA-512 crypt hash. */
  rootPassword: string;
  sshKeys: string[];
}

/**
 * Booting VMs ahead of demand and giving one to a tenant. A VM is handed off
 * at most once; from then on it belongs to the tenant and the driver never
 * talks to anything inside it again. A failed hand-off leaves the VM for the
 * caller to destroy.
 */
export interface WarmPoolSupport {
  /** Create and start an idle VM (root locked, no keys). Same release-on-failure rule as `create`. */
  createIdle(spec: IdleSpec): Promise<WorkloadHandle>;
  /** Wait until the idle VM can take a hand-off (or it dies, or `timeoutMs` passes). */
  waitIdle(id: string, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<ReadyResult>;
  /** Give the idle VM to a tenant; resolves once root's password login is open. Rejects with DriverError `handoff_failed`. */
  handOff(id: string, tenant: TenantSpec, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<void>;
}

/** A driver failure with a stable code the agent can map to a reply. */
export class DriverError extends Error {
  constructor(
    readonly code: 'capacity' | 'launch_failed' | 'handoff_failed' | 'timeout' | 'internal',
    message: string,
    readonly detail?: string,
  ) {
    super(message);
    this.name = 'DriverError';
  }
}
