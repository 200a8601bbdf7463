/**
 * An `Agent`, its `Workloads` and their `Supervisor`, wired as src/service/service.ts wires them
 * but in-process: the real stores on a temporary state directory, a
 * `FakeDriver` instead of qemu, a `MemoryOutbox` instead of Nostr. Every
 * default lives here, so an option the agent gains is added in one place.
 *
 * `restart()` models a crash: a new agent on the same state directory and the
 * same driver (workloads outlive the service), the old one simply abandoned.
 * `stop()` models a clean shutdown, in the service's order.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Agent, type AgentOptions, type Inbound } from '../../src/agent/agent.js';
import { SenderRateLimiter, SpawnAdmission, type SpawnLimits } from '../../src/agent/admission.js';
import { InflightJournal } from '../../src/agent/inflight.js';
import { LeaseStore } from '../../src/agent/leases.js';
import { PaymentFlow } from '../../src/agent/payment-flow.js';
import { PaymentJournal } from '../../src/agent/payment-journal.js';
import type { PricingPolicy } from '../../src/agent/pricing.js';
import type { Payments } from '../../src/payment/types.js';
import type { Plan } from '../../src/agent/plans.js';
import { SeenStore } from '../../src/agent/seen.js';
import { Supervisor } from '../../src/agent/supervisor.js';
import { WarmPool, type WarmPoolOptions } from '../../src/agent/warm-pool.js';
import { Workloads, type WorkloadsOptions } from '../../src/agent/workloads.js';
import { silentLogger, type Logger } from '../../src/util/logger.js';
import { FakeDriver } from './fake-driver.js';
import { MemoryOutbox, type Message } from './memory-outbox.js';

export const SMALL_PLAN: Plan = { id: 'small', name: 'Small', description: 'one vCPU', vcpus: 1, memoryMb: 256, diskGb: 2, durationSeconds: 3600 };
/** A plan at 1000 msat/s: with `payments`, spawns and top-ups of it are paid. */
export const PAID_PLAN: Plan = { id: 'paid', name: 'Paid', description: 'one vCPU, by the second', vcpus: 1, memoryMb: 256, diskGb: 2, durationSeconds: 3600, rateMsatsPerSec: 1000 };
export const BIG_PLAN: Plan = { id: 'big', name: 'Big', description: 'four vCPUs', vcpus: 4, memoryMb: 4096, diskGb: 20, durationSeconds: 3600 };
/** Two idle VMs kept warm; an empty pool means a cold boot. */
export const POOLED_PLAN: Plan = { id: 'pooled', name: 'Pooled', description: 'instant', vcpus: 1, memoryMb: 512, diskGb: 2, durationSeconds: 3600, warmPool: 2 };

/** Roomy enough that only the limit a test lowers can refuse a spawn. */
export const OPEN_LIMITS: SpawnLimits = {
  maxVmsPerSender: 100,
  maxVms: 100,
  maxSpawnsInFlight: 100,
  hostCapacity: { vcpus: 1000, memoryMb: 1_000_000 },
};

/** For `vi.waitFor`: its 1 s default is too short for an fsync on a machine shared with booting guests. */
export const WAIT = { timeout: 20_000, interval: 5 };

export const SPAWN = { type: 'spawn', root_password: 'correct horse battery staple' } as const;

export interface HarnessOptions {
  /** Reuse a state directory (what a restart does); default a fresh temporary one. */
  stateDir?: string;
  driver?: FakeDriver;
  outbox?: MemoryOutbox;
  plans?: Plan[];
  limits?: Partial<SpawnLimits>;
  /** Anything else the agent takes; wins over the defaults here. */
  agent?: Partial<AgentOptions>;
  workloads?: Partial<Pick<WorkloadsOptions, 'readyTimeoutMs' | 'warnBeforeSeconds'>>;
  /** How often the supervisor looks (default 10 ms). */
  tickMs?: number;
  logger?: Logger;
  /** The wallet: set, the agent runs in `paid` mode with a payment journal in the state directory. */
  payments?: Payments;
  /** Default: 60 s minimum, 24 h maximum. */
  pricing?: PricingPolicy;
  /** A payment flow of the test's own over `payments` (to hold one of its steps); default a plain one. */
  paymentFlow?: PaymentFlow;
  /** Run a warm pool for the plans that ask for one (options override the quick test defaults). */
  warmPool?: Partial<Omit<WarmPoolOptions, 'driver' | 'plans' | 'admission'>>;
}

/** A random 64-hex key or id, as the transport would deliver. */
export function hex32(): string {
  return randomBytes(32).toString('hex');
}

const live = new Set<Harness>();
const dirs = new Set<string>();

export class Harness {
  readonly stateDir: string;
  readonly driver: FakeDriver;
  readonly outbox: MemoryOutbox;
  readonly leases: LeaseStore;
  readonly seen: SeenStore;
  readonly inflight: InflightJournal;
  readonly admission: SpawnAdmission;
  readonly workloads: Workloads;
  readonly agent: Agent;
  readonly supervisor: Supervisor;
  readonly payment: PaymentFlow | undefined;
  readonly paymentJournal: PaymentJournal | undefined;
  readonly pool: WarmPool | undefined;
  private stopped = false;

  constructor(private readonly opts: HarnessOptions = {}) {
    this.stateDir = opts.stateDir ?? mkdtempSync(join(tmpdir(), 'paygress-unit-'));
    dirs.add(this.stateDir);
    this.driver = opts.driver ?? new FakeDriver();
    this.outbox = opts.outbox ?? new MemoryOutbox();
    const logger = opts.logger ?? silentLogger;
    this.leases = new LeaseStore(this.stateDir);
    this.leases.load();
    this.seen = new SeenStore(this.stateDir, 3 * 86_400);
    this.inflight = new InflightJournal(this.stateDir);
    this.admission = new SpawnAdmission({ ...OPEN_LIMITS, ...opts.limits }, () => [...this.leases.all(), ...(this.pool?.holdings() ?? [])]);
    const drivers = { [this.driver.kind]: this.driver };
    const plans = opts.plans ?? (opts.payments ? [SMALL_PLAN, BIG_PLAN, PAID_PLAN] : [SMALL_PLAN, BIG_PLAN]);
    if (opts.warmPool) {
      this.pool = new WarmPool({
        driverName: this.driver.kind,
        driver: this.driver,
        plans,
        admission: this.admission,
        logger,
        idleTimeoutMs: 60_000,
        handOffTimeoutMs: 100,
        tickMs: 10,
        backoff: { baseMs: 20, maxMs: 200 },
        ...opts.warmPool,
      });
      this.admission.evictIdle = () => this.pool!.evictIdle();
    }
    if (opts.payments) {
      this.paymentJournal = new PaymentJournal(this.stateDir);
      const policy = opts.pricing ?? { minimumSeconds: 60, maxLeaseSeconds: 86_400 };
      this.payment = opts.paymentFlow ?? new PaymentFlow({ payments: opts.payments, journal: this.paymentJournal, policy, logger });
    }
    this.workloads = new Workloads({
      drivers,
      leases: this.leases,
      inflight: this.inflight,
      outbox: this.outbox,
      logger,
      publicHost: '127.0.0.1',
      readyTimeoutMs: 60_000,
      warnBeforeSeconds: 60,
      plans: () => plans,
      ...(this.payment ? { payment: this.payment } : {}),
      ...(this.pool ? { warmPool: this.pool } : {}),
      ...opts.workloads,
    });
    this.agent = new Agent({
      publicHost: '127.0.0.1',
      tiers: [{ level: 'dedicated-host', driver: this.driver.kind }],
      plans,
      defaultPlan: 'small',
      maxContentBytes: 64 * 1024,
      maxConcurrentRequests: 8,
      maxQueuedRequests: 64,
      leases: this.leases,
      workloads: this.workloads,
      seen: this.seen,
      outbox: this.outbox,
      logger,
      rateLimiter: new SenderRateLimiter({ capacity: 1000, refillPerSecond: 1000 }),
      admission: this.admission,
      ...(this.payment ? { admissionMode: 'paid' as const, payment: this.payment } : {}),
      ...(this.pool ? { warmPool: this.pool } : {}),
      ...opts.agent,
    });
    this.supervisor = new Supervisor({ workloads: this.workloads, tickMs: opts.tickMs ?? 10 });
    live.add(this);
  }

  /** Settle what an earlier run left, then supervise: the service's start order. */
  async start(): Promise<this> {
    await this.opts.payments?.recover();
    await this.workloads.reconcile();
    this.supervisor.start();
    this.pool?.start();
    return this;
  }

  /** Hand one message to the agent; `done` settles when the agent is through with it. */
  deliver(sender: string, body: unknown, ids: { requestId?: string; eventId?: string } = {}): { requestId: string; done: Promise<void> } {
    const requestId = ids.requestId ?? hex32();
    const eventId = ids.eventId ?? hex32();
    const msg: Inbound = {
      dedupeIds: [eventId, requestId],
      requestId,
      sender,
      channel: 'nip17',
      content: typeof body === 'string' ? body : JSON.stringify(body),
    };
    return { requestId, done: this.agent.handle(msg) };
  }

  /** Deliver and return the one reply that answers it (undefined when the agent dropped it). */
  async request(sender: string, body: unknown): Promise<Message | undefined> {
    const { requestId, done } = this.deliver(sender, body);
    await done;
    return this.outbox.about(requestId)[0]?.message;
  }

  /** A spawn that must succeed; returns its access details. */
  async spawn(sender: string, body: Record<string, unknown> = {}): Promise<Message & { workload_id: string; request_id: string }> {
    const reply = await this.request(sender, { ...SPAWN, ...body });
    if (reply?.type !== 'access_details') throw new Error(`spawn refused: ${JSON.stringify(reply)}`);
    return reply as Message & { workload_id: string; request_id: string };
  }

  /** A new agent on the same state directory and driver, as after a crash of this one (which is left as it is). */
  restart(opts: Omit<HarnessOptions, 'stateDir' | 'driver'> = {}): Harness {
    live.delete(this);
    // A dead process acts no more: its timer and watches end here, and work
    // held at a gate is never released, so nothing of it reaches the disk later.
    this.stopped = true;
    void this.agent.drain();
    void this.supervisor.stop();
    this.pool?.halt();
    return new Harness({ ...this.opts, outbox: undefined, ...opts, stateDir: this.stateDir, driver: this.driver });
  }

  /** A clean shutdown in the service's order: no new work, requests in flight finish, supervision ends. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    live.delete(this);
    await this.agent.drain();
    await this.pool?.close();
    await this.supervisor.stop();
    this.driver.close();
  }
}

/** For `afterEach`: stop every harness still running and remove the state directories. */
export async function closeHarnesses(): Promise<void> {
  await Promise.all([...live].map((h) => h.stop()));
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  dirs.clear();
}
