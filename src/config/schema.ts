/**
 * The provider's configuration file: one zod schema, defaults included.
 * Errors name the field and what was expected (see `formatConfigError`).
 */
import { z } from 'zod';
import { ISOLATION_LEVELS } from '../protocol/isolation.js';
import { PLAN_ID_PATTERN } from '../protocol/requests.js';
import { DEVICE_PREFIX_RE, isIpv4, parseCidr, tapConfigProblem } from '../hostnet/plan.js';

const relayUrl = z
  .string()
  .regex(/^wss?:\/\/[^\s]+$/, 'must be a ws:// or wss:// URL');

const planId = z.string().regex(PLAN_ID_PATTERN, 'must be lowercase letters, digits and dashes');

export const PlanSchema = z.object({
  id: planId,
  name: z.string().min(1).max(64),
  description: z.string().max(500).default(''),
  vcpus: z.number().int().min(1).max(256),
  memoryMb: z.number().int().min(64),
  diskGb: z.number().int().min(1),
  /** How long a lease of this plan lasts before the VM is stopped and deleted. */
  durationSeconds: z.number().int().min(1).default(3600),
  /** Price per second of a lease (upstream `rate_msats_per_sec`), charged when `admission.mode` is `paid`; 0 = free. */
  rateMsatsPerSec: z.number().int().min(0).default(0),
  /**
   * Idle VMs of this plan kept booted for instant spawns (the warm pool); 0 = off.
   * They count against `limits` like leased VMs. Only a spawn asking for the
   * plan's full size takes one; smaller requests always boot cold.
   */
  warmPool: z.number().int().min(0).max(64).default(0),
  /** With `warmPool` > 0, a full-size spawn that finds no idle VM: `cold` boots one as usual, `busy` refuses it (retry shortly). */
  whenPoolEmpty: z.enum(['cold', 'busy']).default('cold'),
});

export const DiscoverySchema = z.object({
  /** Publish the offer (kind 38383) and heartbeats (38384 + ephemeral 20384). */
  enabled: z.boolean().default(true),
  heartbeatSeconds: z.number().int().min(1).max(3600).default(60),
  /** Advertised in the offer as `api_endpoint`; null when unset. */
  apiEndpoint: z.string().url().optional(),
  /** Advertised as `capabilities`. */
  capabilities: z.array(z.string().max(32)).max(16).default(['vm', 'kvm', 'ssh']),
});

/** A consumer key in an allowlist: npub or 64 hex. */
const consumerKey = z.string().regex(/^(npub1[02-9ac-hj-np-z]{58}|[0-9a-fA-F]{64})$/, 'must be an npub or 64 hex characters');

/** Who may spawn, and what a paid lease may be. See README "Admission and payment". */
export const AdmissionSchema = z.object({
  /**
   * `open`: any key (demos, labs). `allowlist`: only keys in `allowlist` or
   * `allowlistFile` (re-read when the file changes). `paid`: anyone with a
   * Cashu token worth the plan's rate (plans at rate 0 stay free).
   */
  mode: z.enum(['open', 'allowlist', 'paid']).default('open'),
  allowlist: z.array(consumerKey).max(10_000).default([]),
  /** One npub or hex key per line; `#` starts a comment. */
  allowlistFile: z.string().min(1).optional(),
  /** A payment must buy at least this long; a smaller token is refused before it is swapped. */
  minimumDurationSeconds: z.number().int().min(1).default(60),
  /** No paid lease runs longer (also after top-ups); what a token would buy beyond is refunded. */
  maxLeaseSeconds: z.number().int().min(60).default(7 * 24 * 3600),
});

/** The provider's Cashu wallet. See docs/payment.md. */
export const PaymentSchema = z.object({
  /** Mints whose tokens are accepted (http(s) URLs; compared after normalising case and trailing slash). Tokens of other mints are refused without contacting them. */
  whitelistedMints: z
    .array(z.string().regex(/^https?:\/\/[^\s?#@]+$/, 'must be an http(s) mint URL without query, fragment or credentials'))
    .max(32)
    .default([]),
  /** Timeout of each request to a mint; a swap that times out is settled from the wallet journal. */
  mintTimeoutMs: z.number().int().min(1000).max(120_000).default(10_000),
});

const ipv4 = z.string().refine(isIpv4, 'must be an IPv4 address');

/**
 * The tap network (network: "tap"): a pool of persistent taps the install-time
 * setup (`paygress-agent net up`, systemd/paygress-agent-net.service) makes
 * and fences with nftables. Slot i: tap `${devicePrefix}i`, the i-th /30 of
 * `subnet`, SSH port `portRange.from + i`.
 */
export const TapSchema = z.object({
  /** Guests with a network at once; at most the port range's size. */
  slots: z.number().int().min(1).max(1024).default(32),
  devicePrefix: z.string().regex(DEVICE_PREFIX_RE, 'must be 1-10 lowercase letters/digits, starting with a letter').default('pgtap'),
  /** Where the guests' /30s come from; must not overlap the host's own networks. */
  subnet: z
    .string()
    .refine((v) => {
      try {
        parseCidr(v);
        return true;
      } catch {
        return false;
      }
    }, 'must be an IPv4 CIDR with zero host bits, /30 or shorter')
    .default('10.77.0.0/16'),
  /** Host addresses whose slot ports are forwarded to the guests; empty = every address of the host. */
  publicAddresses: z.array(ipv4).default([]),
  /** Also forward 127.0.0.1:port (sets route_localnet on the taps; the nftables input chain still fences the host). */
  loopbackForward: z.boolean().default(false),
  /** The guests' DNS resolver: allowed explicitly, even on a private address. */
  dnsResolver: ipv4.default('1.1.1.1'),
  /** The service user: owns the taps so its qemu opens them without privileges. */
  user: z.string().regex(/^[a-z_][a-z0-9_-]{0,31}$/).default('paygress'),
});

export const KvmConfigSchema = z.object({
  qemuBinary: z.string().default('qemu-system-x86_64'),
  qemuImgBinary: z.string().default('qemu-img'),
  isoTool: z.string().default('genisoimage'),
  /** `auto` uses KVM when /dev/kvm opens read-write, else TCG (slow) with a warning. */
  accel: z.enum(['auto', 'kvm', 'tcg']).default('auto'),
  vmRoot: z.string().default('/var/lib/paygress-agent/vms'),
  /** Cache of the disk-overlay templates qemu-img makes once per run (one ~200 KiB file per disk size). */
  overlayTemplateDir: z.string().default('/var/cache/paygress-agent/overlays'),
  baseImage: z.string().min(1),
  baseImageFormat: z.enum(['qcow2', 'raw']).default('qcow2'),
  /** Where to download the base image from when it is missing (https, or http with a sha256). */
  baseImageUrl: z.string().url().optional(),
  /** SHA-256 the downloaded base image must have. */
  baseImageSha256: z.string().regex(/^[0-9a-fA-F]{64}$/, 'must be 64 hex characters').optional(),
  /** Direct kernel boot, for base images without a bootloader. */
  kernel: z.string().optional(),
  initrd: z.string().optional(),
  append: z.string().optional(),
  /** Address the forwarded SSH ports listen on. */
  bindAddress: z.string().default('0.0.0.0'),
  /**
   * Guest network, see docs/security.md. `restricted`: SSH forward only, the
   * guest can open no connection (not to the host's 127.0.0.1). `user`: also
   * outbound, and the guest reaches the host's loopback at 10.0.2.2. `passt`:
   * outbound without the host's loopback; needs a passt newer than Debian 12's for the SSH forward.
   * `tap`: internet, fenced from the host, private ranges and other guests by
   * nftables; needs the install-time setup (see `tap`). The default stays
   * `restricted` because it needs no setup as root; the example config and
   * README's install section use `tap`.
   */
  network: z.enum(['restricted', 'user', 'passt', 'tap']).default('restricted'),
  tap: TapSchema.prefault({}),
  passtBinary: z.string().default('passt'),
  /**
   * Nice value every guest's qemu gets once started (its threads and its
   * autogroup): guests yield the CPU to the host's own work (the agent's next
   * spawn, sshd) under contention, and stay equal among themselves. 0 = off.
   */
  guestNice: z.number().int().min(0).max(19).default(10),
  /** Most bytes of a guest's console kept in its serial.log (boot_failed shows its tail); the rest is dropped oldest first. */
  consoleLogBytes: z.number().int().min(4096).max(64 * 1024 * 1024).default(262_144),
  /**
   * oom_score_adj every guest's qemu gets once started: the kernel's OOM
   * killer takes a tenant's VM before the agent (the unit sets the agent's
   * OOMScoreAdjust=-900). The service can raise it, not lower it below the unit's.
   */
  guestOomScoreAdj: z.number().int().min(-1000).max(1000).default(500),
  portRange: z
    .object({ from: z.number().int().min(1024).max(65535), to: z.number().int().min(1024).max(65535) })
    .refine((r) => r.from <= r.to, 'from must be <= to')
    .default({ from: 42000, to: 42999 }),
  namePrefix: z.string().regex(/^[a-z][a-z0-9-]{0,15}$/).default('paygress-'),
  pidfileTimeoutMs: z.number().int().min(100).default(15_000),
  stopTimeoutMs: z.number().int().min(100).default(5_000),
  /** `cloud-init`: ready = SSH banner + cloud-init finished (password set). `ssh-banner`: the banner alone. */
  readiness: z.enum(['cloud-init', 'ssh-banner']).default('cloud-init'),
  /** After this long without readiness the VM is deleted and the owner gets `boot_failed`. */
  readyTimeoutMs: z.number().int().min(1000).default(300_000),
}).superRefine((kvm, ctx) => {
  if (kvm.network !== 'tap') return;
  const ports = kvm.portRange.to - kvm.portRange.from + 1;
  if (kvm.tap.slots > ports) ctx.addIssue({ code: 'custom', path: ['tap', 'slots'], message: `must be at most the port range's size (${ports}): slot i uses port portRange.from + i` });
  const problem = tapConfigProblem({ ...kvm.tap, firstPort: kvm.portRange.from });
  if (problem) ctx.addIssue({ code: 'custom', path: ['tap'], message: problem });
});

export const ConfigSchema = z
  .object({
    provider: z.object({
      /** File holding the provider's nsec; must be mode 0600. Env: PAYGRESS_KEY_FILE. */
      keyFile: z.string().min(1),
      /** Address consumers connect to (public IP or DNS name). Sent in every access-details reply. */
      publicHost: z.string().min(1),
      name: z.string().max(64).default('paygress provider'),
      location: z.string().max(64).default(''),
    }),
    relays: z.array(relayUrl).min(1),
    stateDir: z.string().default('/var/lib/paygress-agent'),
    logLevel: z.enum(['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent']).default('info'),
    /** Isolation tiers this provider offers and which driver serves each. */
    tiers: z
      .array(z.object({ level: z.enum(ISOLATION_LEVELS), driver: z.enum(['kvm']) }))
      .min(1),
    plans: z.array(PlanSchema).min(1),
    defaultPlan: planId,
    limits: z
      .object({
        maxContentBytes: z.number().int().min(256).max(1_048_576).default(65_536),
        /** Requests handled at the same time; more wait in line. */
        maxConcurrentRequests: z.number().int().min(1).max(256).default(8),
        /**
         * Requests waiting for a slot; beyond it a sender is answered `busy`
         * (once per 10 s, then dropped). Holders of a workload wait in a
         * separate lane of the same size, served first.
         */
        maxQueuedRequests: z.number().int().min(0).max(100_000).default(64),
        /** Per-sender token bucket over every request type: refill rate and burst. Over it: `rate_limited`. */
        ratePerMinute: z.number().positive().max(1_000_000).default(30),
        rateBurst: z.number().int().min(1).max(1_000_000).default(10),
        /** Live workloads one key may hold (`quota_exceeded`) and the host may run (`capacity_exhausted`). */
        maxVmsPerSender: z.number().int().min(1).default(3),
        maxVms: z.number().int().min(1).default(32),
        /** Spawns being set up at once; more get `busy`. */
        maxSpawnsInFlight: z.number().int().min(1).max(256).default(4),
        /**
         * What spawns may commit in total (`capacity_exhausted` beyond). Each
         * field left out is derived: CPU cores x 4 vCPUs; total RAM minus
         * max(1 GiB, 10 %) (see agent/admission.ts).
         */
        hostCapacity: z
          .object({ vcpus: z.number().int().min(1).optional(), memoryMb: z.number().int().min(64).optional() })
          .optional(),
        /**
         * Disk kept free under the VM root (GB). Every overlay may grow to its
         * plan's diskGb: a spawn is admitted only if what live workloads may
         * still write, plus its own diskGb, plus this reserve fits in the free
         * space (`capacity_exhausted` otherwise).
         */
        diskReserveGb: z.number().min(0).default(2),
      })
      // prefault: a missing section is parsed as {}, so each field's own default applies (one place per value).
      .prefault({}),
    leases: z
      .object({
        /** How often leases are checked for expiry and for dead workloads. */
        checkIntervalMs: z.number().int().min(100).max(60_000).default(2_000),
        /** The owner gets an `expiring` notice this long before the end. */
        warnBeforeSeconds: z.number().int().min(0).default(300),
      })
      .prefault({}),
    drivers: z.object({ kvm: KvmConfigSchema.optional() }),
    discovery: DiscoverySchema.prefault({}),
    admission: AdmissionSchema.prefault({}),
    payment: PaymentSchema.prefault({}),
  })
  .superRefine((cfg, ctx) => {
    if (cfg.admission.mode === 'paid' && cfg.payment.whitelistedMints.length === 0) {
      ctx.addIssue({ code: 'custom', path: ['payment', 'whitelistedMints'], message: 'must name at least one mint when admission.mode is paid' });
    }
    if (!cfg.plans.some((p) => p.id === cfg.defaultPlan)) {
      ctx.addIssue({ code: 'custom', path: ['defaultPlan'], message: `must be the id of one of the plans (${cfg.plans.map((p) => p.id).join(', ')})` });
    }
    const ids = new Set<string>();
    cfg.plans.forEach((p, i) => {
      if (ids.has(p.id)) ctx.addIssue({ code: 'custom', path: ['plans', i, 'id'], message: 'must be unique' });
      ids.add(p.id);
    });
    const levels = new Set<string>();
    cfg.tiers.forEach((t, i) => {
      if (levels.has(t.level)) ctx.addIssue({ code: 'custom', path: ['tiers', i, 'level'], message: 'is offered twice' });
      levels.add(t.level);
      if (!cfg.drivers[t.driver]) {
        ctx.addIssue({ code: 'custom', path: ['drivers', t.driver], message: `must be configured: tier ${t.level} uses it` });
      }
    });
  });

export type Config = z.infer<typeof ConfigSchema>;
export type PlanConfig = z.infer<typeof PlanSchema>;
export type KvmConfig = z.infer<typeof KvmConfigSchema>;
export type DiscoveryConfig = z.infer<typeof DiscoverySchema>;
export type AdmissionConfig = z.infer<typeof AdmissionSchema>;
export type PaymentConfig = z.infer<typeof PaymentSchema>;
