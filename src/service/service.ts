/**
 * The composition root: config → key, drivers, stores, relay pool, agent.
 * Wires the Nostr inbox to the agent and the agent's outbox to Nostr; the
 * only module that knows both sides.
 */
import { Agent } from '../agent/agent.js';
import { SenderRateLimiter, SpawnAdmission, resolveHostCapacity } from '../agent/admission.js';
import { InflightJournal } from '../agent/inflight.js';
import { Supervisor } from '../agent/supervisor.js';
import { Workloads } from '../agent/workloads.js';
import { LeaseStore } from '../agent/leases.js';
import { SeenStore } from '../agent/seen.js';
import { Allowlist } from '../agent/allowlist.js';
import { PaymentFlow } from '../agent/payment-flow.js';
import type { PricingPolicy } from '../agent/pricing.js';
import { PaymentJournal } from '../agent/payment-journal.js';
import { WarmPool } from '../agent/warm-pool.js';
import { createPayments } from '../payment/index.js';
import { join } from 'node:path';
import type { Config } from '../config/schema.js';
import { applyLiveFields, planReload, type ReloadPlan } from '../config/reload.js';
import type { ComputeDriver } from '../drivers/types.js';
import { KvmDriver, ensureBaseImage } from '../drivers/kvm/index.js';
import { dmFilter, TWO_DAYS, type OpenResult } from '../nostr/dm.js';
import { pubkeyOf, readKeyFile } from '../nostr/keys.js';
import { RelayPool } from '../nostr/relays.js';
import type { NostrEvent } from '../nostr/types.js';
import { UnwrapPool } from '../nostr/unwrap-pool.js';
import type { Logger } from '../util/logger.js';
import { NostrOutbox } from './nostr-outbox.js';
import { DiscoveryPublisher } from '../discovery/publisher.js';

/** Clock slack beyond the two days gift wraps may be back-dated (NIP-59). */
const SINCE_SLACK_SECONDS = 3600;
/** How far back the subscription reaches; older DMs are dropped. */
export const SINCE_WINDOW_SECONDS = TWO_DAYS + SINCE_SLACK_SECONDS;
/** Remember taken ids for longer than anything the subscription can bring back. */
const SEEN_RETENTION_SECONDS = 2 * SINCE_WINDOW_SECONDS;
/**
 * Events received and not yet opened; beyond it new ones are left to the
 * relays (read again at the next reconnect or restart): opening is the one
 * cost paid before the sender is known, so this bounds what a flood of fresh
 * keys can queue, in memory and in waiting time.
 */
const MAX_UNOPENED_EVENTS = 1024;
/** How often the counters line is logged (and once more at shutdown). */
const STATS_INTERVAL_MS = 60_000;
/** How long handing a pool VM to its tenant may take before that VM is destroyed and the next one tried. */
const HANDOFF_TIMEOUT_MS = 20_000;

export interface RunningService {
  pubkey: string;
  agent: Agent;
  pool: RelayPool;
  /** Apply what a re-read config may change while running (see config/reload.ts); the rest is kept and reported. */
  reload(next: Config): ReloadPlan;
  stop(): Promise<void>;
}

export async function startService(initial: Config, logger: Logger): Promise<RunningService> {
  // Replaced by reload(): what reads it later (admission, the offer) sees the live fields.
  let cfg = initial;
  const sk = await readKeyFile(cfg.provider.keyFile);
  const pubkey = pubkeyOf(sk);

  const drivers: Record<string, ComputeDriver> = {};
  let kvmDriver: KvmDriver | undefined;
  const kvm = cfg.drivers.kvm;
  if (kvm) {
    // Missing base image + configured URL → download and verify now, before any spawn needs it.
    await ensureBaseImage({
      path: kvm.baseImage,
      url: kvm.baseImageUrl,
      sha256: kvm.baseImageSha256,
      format: kvm.baseImageFormat,
      qemuImgBinary: kvm.qemuImgBinary,
      logger: logger.child({ part: 'base-image' }),
    });
    drivers.kvm = kvmDriver = new KvmDriver(kvm, logger.child({ driver: 'kvm' }));
  }

  const leases = new LeaseStore(cfg.stateDir);
  const loaded = leases.load();
  if (loaded.broken.length) logger.warn({ files: loaded.broken }, 'unreadable lease files left in place');
  const seen = new SeenStore(cfg.stateDir, SEEN_RETENTION_SECONDS, {
    onWriteError: (what, err) => logger.warn({ part: 'seen', what, code: err.code, err: err.message }, 'seen-id log not written; requests wait until it can be'),
  });
  const inflight = new InflightJournal(cfg.stateDir);

  const pool = new RelayPool({ urls: cfg.relays, logger: logger.child({ part: 'relays' }) });
  const outbox = new NostrOutbox({ sk, pool, spoolDir: join(cfg.stateDir, 'outbox'), logger: logger.child({ part: 'outbox' }) });
  // The wallet and the payment journal exist in every mode: money owed from a
  // paid run must still be settled after the operator switches to open.
  const payments = createPayments({ stateDir: cfg.stateDir, providerSecretKey: sk, config: cfg.payment, logger: logger.child({ part: 'wallet' }) });
  const payment = new PaymentFlow({
    payments,
    journal: new PaymentJournal(cfg.stateDir),
    policy: pricingPolicy(cfg.admission),
    logger: logger.child({ part: 'payment' }),
  });
  const allowlistOf = (admission: Config['admission']) =>
    admission.mode === 'allowlist' ? new Allowlist(admission.allowlist, admission.allowlistFile, logger.child({ part: 'allowlist' })) : undefined;
  const allowlist = allowlistOf(cfg.admission);
  logger.info({ mode: cfg.admission.mode, whitelistedMints: offeredMints(cfg) }, 'admission');
  const rateLimiter = new SenderRateLimiter({ capacity: cfg.limits.rateBurst, refillPerSecond: cfg.limits.ratePerMinute / 60 });
  const spawnLimits = (limits: Config['limits']) => ({
    maxVmsPerSender: limits.maxVmsPerSender,
    maxVms: limits.maxVms,
    maxSpawnsInFlight: limits.maxSpawnsInFlight,
    hostCapacity: resolveHostCapacity(limits.hostCapacity),
  });
  const startLimits = spawnLimits(cfg.limits);
  logger.info({ hostCapacity: startLimits.hostCapacity, limits: { ...cfg.limits, hostCapacity: undefined } }, 'admission limits');
  // Set below; admission counts its VMs like leased ones.
  let warmPool: WarmPool | undefined;
  const admission = new SpawnAdmission(
    startLimits,
    () => [...leases.all(), ...(warmPool?.holdings() ?? [])],
    kvmDriver && {
      // A getter: reload() replaces cfg, and the reserve applies from the next spawn on.
      get reserveGb() {
        return cfg.limits.diskReserveGb;
      },
      read: (live) => kvmDriver!.diskReading(live.flatMap((h) => (h.workloadId ? [h.workloadId] : []))),
    },
  );
  // Typed as the contract: the pool needs only the driver's optional `warm` side.
  const poolDriver: ComputeDriver | undefined = kvmDriver;
  if (poolDriver?.warm) {
    warmPool = new WarmPool({
      driverName: 'kvm',
      driver: poolDriver,
      plans: cfg.plans,
      admission,
      logger: logger.child({ part: 'pool' }),
      idleTimeoutMs: kvm!.readyTimeoutMs,
      handOffTimeoutMs: HANDOFF_TIMEOUT_MS,
    });
    admission.evictIdle = () => warmPool!.evictIdle();
  } else if (cfg.plans.some((p) => p.warmPool)) {
    logger.warn({ plans: cfg.plans.filter((p) => p.warmPool).map((p) => p.id) }, 'plans ask for a warm pool but the driver cannot keep idle VMs; every spawn boots cold');
  }
  const workloads = new Workloads({
    drivers,
    leases,
    inflight,
    outbox,
    logger,
    publicHost: cfg.provider.publicHost,
    readyTimeoutMs: cfg.drivers.kvm?.readyTimeoutMs ?? 300_000,
    warnBeforeSeconds: cfg.leases.warnBeforeSeconds,
    // A getter: reload() replaces cfg.
    plans: () => cfg.plans,
    payment,
    warmPool,
  });
  const agent = new Agent({
    publicHost: cfg.provider.publicHost,
    tiers: cfg.tiers,
    plans: cfg.plans,
    defaultPlan: cfg.defaultPlan,
    maxContentBytes: cfg.limits.maxContentBytes,
    maxConcurrentRequests: cfg.limits.maxConcurrentRequests,
    maxQueuedRequests: cfg.limits.maxQueuedRequests,
    leases,
    workloads,
    seen,
    outbox,
    logger,
    rateLimiter,
    admission,
    admissionMode: cfg.admission.mode,
    allowlist,
    payment,
    warmPool,
  });
  const supervisor = new Supervisor({ workloads, tickMs: cfg.leases.checkIntervalMs });

  // Quiet: DMs open on the main thread, one per event-loop turn; under a backlog
  // in worker threads, so a flood of DMs cannot starve the event loop.
  const unwrap = new UnwrapPool({ sk, pubkey, logger: logger.child({ part: 'unwrap' }) });
  const inbox = { unopenedDropped: 0, ignored: {} as Record<string, number>, tooOld: 0 };
  const onEvent = (event: NostrEvent): boolean => {
    if (unwrap.stats().pending >= MAX_UNOPENED_EVENTS) {
      inbox.unopenedDropped++;
      return false;
    }
    const unwrapStarted = performance.now();
    void unwrap
      .open(event)
      .then((opened) => onOpened(event, opened, unwrapStarted))
      // This runs after the relay pool's handler returned, outside its guard: keep a throw from becoming an unhandled rejection.
      .catch((err: unknown) => logger.error({ eventId: event.id, err: (err as Error).message }, 'error while handling event'));
    return true;
  };
  const onOpened = (event: NostrEvent, opened: OpenResult, unwrapStarted: number): void => {
    // Includes time queued behind other events.
    const unwrapMs = Math.round((performance.now() - unwrapStarted) * 10) / 10;
    if (!opened.ok) {
      inbox.ignored[opened.reason] = (inbox.ignored[opened.reason] ?? 0) + 1;
      // Wraps for other keys are normal traffic on shared relays; not worth a warning.
      logger.debug({ eventId: event.id, reason: opened.reason }, 'event ignored');
      return;
    }
    const dm = opened.dm;
    if (dm.createdAt < Math.floor(Date.now() / 1000) - SINCE_WINDOW_SECONDS) {
      inbox.tooOld++;
      logger.debug({ eventId: dm.eventId }, 'request older than the window ignored');
      return;
    }
    void agent.handle({
      dedupeIds: dm.eventId === dm.requestId ? [dm.eventId] : [dm.eventId, dm.requestId],
      requestId: dm.requestId,
      sender: dm.sender,
      channel: dm.channel,
      content: dm.content,
      unwrapMs,
      createdAt: dm.createdAt,
    });
  };

  // One line with every counter from frame to reply: what a flood cost and where it was stopped.
  const logStats = (msg: string): void => {
    const { workers, pending, crashes } = unwrap.stats();
    logger.info({ relays: pool.stats(), inbox: { ...inbox, unopened: pending, unwrapWorkers: workers, unwrapCrashes: crashes }, requests: agent.stats(), warmPool: warmPool?.stats() }, msg);
  };
  const statsTimer = setInterval(() => logStats('stats'), STATS_INTERVAL_MS);
  statsTimer.unref();

  pool.start();
  outbox.resume();
  // Settle what an earlier run left before taking new work; its notices queue
  // in the outbox until a relay is connected. Money first: the wallet settles
  // its half-done swaps, then paid requests are finished and answered (with
  // their refunds) before the spawn journal would answer them without.
  await payments.recover().catch((err: Error) => logger.error({ err: err.message }, 'wallet recovery failed; retried at the next start'));
  await workloads.reconcile();
  supervisor.start();
  // After the sweep above removed the previous run's pool VMs (they have no lease).
  warmPool?.start();
  const discovery = cfg.discovery.enabled
    ? new DiscoveryPublisher({
        sk,
        pubkey,
        pool,
        offer: () => ({
          pubkey,
          name: cfg.provider.name,
          location: cfg.provider.location,
          capabilities: cfg.discovery.capabilities,
          plans: cfg.plans,
          isolationLevels: cfg.tiers.map((t) => t.level),
          apiEndpoint: cfg.discovery.apiEndpoint,
          totalJobsCompleted: 0,
          whitelistedMints: offeredMints(cfg),
        }),
        // Pool VMs a spawn cannot have (none today) hold their share too; only leases are active workloads.
        held: () => [...leases.all(), ...(warmPool?.holdings() ?? [])],
        active: () => leases.all().length,
        vmRoot: cfg.drivers.kvm?.vmRoot ?? cfg.stateDir,
        heartbeatSeconds: cfg.discovery.heartbeatSeconds,
        logger: logger.child({ part: 'discovery' }),
      })
    : undefined;
  discovery?.start();
  // The window is recomputed at every (re)connect: always the last two days
  // plus slack, never "newest seen" (gift-wrap timestamps are random).
  const sub = pool.subscribe(
    () => [dmFilter(pubkey, SINCE_SLACK_SECONDS)],
    onEvent,
  );
  logger.info({ pubkey, relays: cfg.relays, tiers: cfg.tiers.map((t) => t.level) }, 'agent listening');

  return {
    pubkey,
    agent,
    pool,
    reload(next: Config): ReloadPlan {
      const plan = planReload(cfg, next);
      if (plan.live.length === 0) return plan;
      const after = applyLiveFields(cfg, next);
      logger.level = after.logLevel;
      const relays = pool.setRelays(after.relays);
      if (relays.added.length || relays.removed.length) logger.info(relays, 'relays changed');
      rateLimiter.reconfigure({ capacity: after.limits.rateBurst, refillPerSecond: after.limits.ratePerMinute / 60 });
      admission.setLimits(spawnLimits(after.limits));
      agent.updatePolicy({
        plans: after.plans,
        defaultPlan: after.defaultPlan,
        maxContentBytes: after.limits.maxContentBytes,
        maxConcurrentRequests: after.limits.maxConcurrentRequests,
        maxQueuedRequests: after.limits.maxQueuedRequests,
      });
      warmPool?.setPlans(after.plans);
      if (plan.live.some((path) => path.startsWith('admission'))) {
        agent.updateAdmission({ admissionMode: after.admission.mode, allowlist: allowlistOf(after.admission) });
        payment.setPolicy(pricingPolicy(after.admission));
      }
      cfg = after;
      return plan;
    },
    async stop() {
      sub.close();
      // Events already received still open and reach the agent before it drains.
      await unwrap.close();
      await discovery?.stop();
      await agent.drain();
      await warmPool?.close();
      await supervisor.stop();
      outbox.close();
      for (const d of Object.values(drivers)) d?.close();
      await pool.close();
      clearInterval(statsTimer);
      logStats('stats at shutdown');
      logger.info('agent stopped; workloads keep running');
    },
  };
}

/** The mints the offer names and the admission log shows: only a paid provider takes tokens. */
function offeredMints(cfg: Config): string[] {
  return cfg.admission.mode === 'paid' ? cfg.payment.whitelistedMints : [];
}

function pricingPolicy(admission: Config['admission']): PricingPolicy {
  return { minimumSeconds: admission.minimumDurationSeconds, maxLeaseSeconds: admission.maxLeaseSeconds };
}
