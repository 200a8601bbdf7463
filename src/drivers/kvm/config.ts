/**
 * Configuration of the KVM/qemu driver. Plain TypeScript: the agent's zod
 * config schema produces exactly this shape (and owns the defaults).
 */
import type { TapNetworkConfig } from '../../hostnet/plan.js';

export interface KvmDriverConfig {
  /** qemu system emulator, e.g. `qemu-system-x86_64`. */
  qemuBinary: string;
  /** e.g. `qemu-img`. */
  qemuImgBinary: string;
  /** ISO 9660 builder for the NoCloud seed, e.g. `genisoimage`. */
  isoTool: string;
  /** `auto` = kvm when /dev/kvm opens read-write, else tcg (with a warning). */
  accel: 'auto' | 'kvm' | 'tcg';
  /** One directory per workload is made under here. */
  vmRoot: string;
  /**
   * Folder for the per-size overlay templates qemu-img makes once per run
   * (overlay.ts); a cache, safe to delete while the agent is stopped.
   */
  overlayTemplateDir: string;
  /** Absolute path of the read-only base image every overlay backs onto. */
  baseImage: string;
  baseImageFormat: 'qcow2' | 'raw';
  /** Optional direct kernel boot. */
  kernel?: string;
  initrd?: string;
  append?: string;
  /** Host address the SSH hostfwd listens on, e.g. `0.0.0.0` or `127.0.0.1`. */
  bindAddress: string;
  /** Inclusive range of host ports handed out for SSH forwarding. */
  portRange: { from: number; to: number };
  /** qemu `-name` is `${namePrefix}${id}`. */
  namePrefix: string;
  /** How long to wait for qemu's pidfile after launch. */
  pidfileTimeoutMs: number;
  /** SIGTERM → wait this long → SIGKILL. */
  stopTimeoutMs: number;
  /**
   * What "ready" means: `cloud-init` = SSH banner and cloud-init's final
   * message on the serial console (the password is set); `ssh-banner` = the
   * banner alone, for images without cloud-init.
   */
  readiness: 'cloud-init' | 'ssh-banner';
  /**
   * Guest network (docs/security.md). `restricted` (default): qemu user-mode
   * network with `restrict=on`; the SSH hostfwd works, the guest cannot open
   * any connection (not to the host's loopback, not to the internet).
   * `user`: qemu user-mode network with hostfwd; the guest has outbound access
   * and reaches the host's 127.0.0.1 at 10.0.2.2. `passt`: one passt per VM
   * with `--no-map-gw`: outbound access without the host's loopback, but
   * Debian 12's passt (git20230309) does not complete inbound TCP to the
   * guest, so the SSH forward needs a newer passt. `tap`: one persistent
   * tap per guest from the pool the install-time setup made (src/hostnet/),
   * fenced by its nftables table; `tap` must be set then.
   */
  network?: 'restricted' | 'user' | 'passt' | 'tap';
  /** The tap pool (src/hostnet/plan.ts); slot i's SSH port is `portRange.from + i`. */
  tap?: Omit<TapNetworkConfig, 'firstPort'>;
  /** e.g. `passt`. */
  passtBinary?: string;
  /**
   * Nice value (1-19) every guest's qemu threads and autogroup get once it has
   * started, so that tenant guests cannot starve the host's control plane (the
   * next spawn's qemu-img, genisoimage and qemu launch); all guests alike, so
   * tenants stay equal among themselves. 0 or absent: leave them as started.
   */
  guestNice?: number;
  /**
   * Most bytes of a workload's console kept in its serial.log (the driver
   * drains qemu's console ring into it while it watches the guest boot).
   * Default 256 KiB.
   */
  consoleLogBytes?: number;
  /**
   * The OOM killer's preference for every guest's qemu (-1000..1000, written
   * to /proc/<pid>/oom_score_adj once it runs): above the agent's, so that
   * under memory pressure a tenant's VM goes before the agent that serves all
   * of them. Unprivileged processes may raise it, not lower it below what the
   * unit set. Absent: left as inherited.
   */
  guestOomScoreAdj?: number;
}

/** The slot plan's input for a driver config in `tap` mode. */
export function tapNetworkOf(config: Pick<KvmDriverConfig, 'tap' | 'portRange'>): TapNetworkConfig {
  if (!config.tap) throw new RangeError('network "tap" needs drivers.kvm.tap');
  return { ...config.tap, firstPort: config.portRange.from };
}
