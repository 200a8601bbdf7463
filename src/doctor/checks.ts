/**
 * The doctor's checks, one function each. Every check does the real thing
 * (opens the key file, binds the ports, boots a test guest, talks to the
 * relay) and never throws: a problem is a `warn` or `fail` row with a fix.
 * Nothing here changes the host, except short-lived temp files.
 *
 * Longer than the house's ~350 lines: one short function per row of the
 * report, kept in one file so the order of the rows reads top to bottom.
 */
import { constants } from 'node:fs';
import { access, mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { execa } from 'execa';
import WebSocket from 'ws';
import type { KvmConfig } from '../config/schema.js';
import { BaseImageError, ensureBaseImage, humanBytes } from '../drivers/kvm/base-image.js';
import { kvmUsable } from '../drivers/kvm/accel.js';
import { probeGuest } from '../drivers/kvm/kvm-probe.js';
import { canBind } from '../drivers/kvm/ports.js';
import { isWorkloadId, vmFile, workloadDir } from '../drivers/kvm/workload-files.js';
import { npubOf, pubkeyOf, readKeyFile } from '../nostr/keys.js';
import { freeBytesUnder } from '../util/free-space.js';
import { silentLogger } from '../util/logger.js';
import type { CheckResult } from './report.js';

// ------------------------------------------------------------------ accel

export interface AccelCheckOptions {
  /** Defaults to /dev/kvm; tests point it elsewhere. */
  device?: string;
  /**
   * Also boot the probe under kvm when accel is `tcg` or `auto`, to tell the
   * operator what the host could do. `run` skips it: under a broken KVM the
   * probe waits for its timeout.
   */
  probeUnused?: boolean;
  timeoutMs?: number;
}

const TCG_FIX = 'set drivers.kvm.accel to "tcg" (software emulation: guests run many times slower)';

/**
 * KVM "really usable" = a test guest boots to long mode under `-accel kvm
 * -cpu host` (see kvm-probe.ts), not merely "/dev/kvm opens".
 */
export async function checkAccel(kvm: Pick<KvmConfig, 'accel' | 'qemuBinary'>, opts: AccelCheckOptions = {}): Promise<CheckResult> {
  const name = 'accel';
  const device = opts.device ?? '/dev/kvm';
  const wantKvmProbe = kvm.accel === 'kvm' || opts.probeUnused === true;
  const opens = await kvmUsable(device);
  const kvmProbe = opens && wantKvmProbe ? await probeGuest({ qemuBinary: kvm.qemuBinary, accel: 'kvm', timeoutMs: opts.timeoutMs }) : undefined;

  if (kvm.accel === 'kvm') {
    if (!opens) {
      return {
        name,
        status: 'fail',
        detail: `accel is kvm but ${device} cannot be opened read-write`,
        fix: `load the kvm module (modprobe kvm_intel or kvm_amd), give the agent's user access to ${device} (group kvm), or ${TCG_FIX}`,
      };
    }
    if (kvmProbe?.ok) return { name, status: 'ok', detail: `kvm: a test guest booted in ${kvmProbe.ms} ms` };
    return { name, status: 'fail', detail: `accel is kvm but ${device} cannot run a guest: ${kvmProbe?.detail ?? 'unknown'}`, fix: TCG_FIX };
  }

  // tcg (configured, or where auto falls back): it must work, it is what VMs will use.
  const tcgUsed = kvm.accel === 'tcg' || !opens || (kvmProbe !== undefined && !kvmProbe.ok);
  if (tcgUsed) {
    const tcg = await probeGuest({ qemuBinary: kvm.qemuBinary, accel: 'tcg', timeoutMs: Math.max(opts.timeoutMs ?? 0, 10_000) });
    if (!tcg.ok) {
      return { name, status: 'fail', detail: `a test guest does not boot under tcg either: ${tcg.detail ?? 'unknown'}`, fix: 'install qemu-system-x86 (Debian) or set drivers.kvm.qemuBinary' };
    }
    const what = kvm.accel === 'tcg' ? 'tcg as configured' : 'auto → tcg';
    if (!opens) {
      return kvm.accel === 'tcg'
        ? { name, status: 'ok', detail: `${what} (test guest booted in ${tcg.ms} ms); no usable ${device}` }
        : { name, status: 'warn', detail: `${what}: ${device} cannot be opened; guests are slow`, fix: `enable KVM for full-speed guests (modprobe kvm_intel/kvm_amd, access to ${device}), or ${TCG_FIX} to make it explicit` };
    }
    if (kvmProbe && !kvmProbe.ok) {
      return {
        name,
        status: 'warn',
        detail: `${what}; ${device} is present but unusable: ${kvmProbe.detail ?? 'unknown'}`,
        fix: kvm.accel === 'tcg' ? 'nothing while drivers.kvm.accel is "tcg"; repair the host\'s KVM for full-speed guests' : TCG_FIX,
      };
    }
    // accel tcg, device opens, kvm not probed (run) or probed fine.
    if (kvmProbe?.ok) {
      return { name, status: 'warn', detail: `${what}, but kvm works here (test guest booted in ${kvmProbe.ms} ms)`, fix: 'set drivers.kvm.accel to "auto" or "kvm" for full-speed guests' };
    }
    return { name, status: 'ok', detail: `${what} (test guest booted in ${tcg.ms} ms)` };
  }
  // auto with a working kvm, or auto not probed (run: the driver probes at first spawn).
  if (kvmProbe?.ok) return { name, status: 'ok', detail: `auto → kvm: a test guest booted in ${kvmProbe.ms} ms` };
  return { name, status: 'ok', detail: `auto: ${device} opens; the driver boots a test guest before its first VM and falls back to tcg if it hangs` };
}

// ------------------------------------------------------------------ tools

async function versionOf(binary: string, args: string[]): Promise<{ ok: true; version: string } | { ok: false; error: string }> {
  const r = await execa(binary, args, { stdin: 'ignore', reject: false, timeout: 10_000, all: true });
  if ((r as { code?: string }).code === 'ENOENT') return { ok: false, error: `${binary} not found` };
  const first = String(r.all ?? '').split('\n').find((l) => l.trim()) ?? '';
  if (r.exitCode !== 0) return { ok: false, error: `${binary} ${args.join(' ')} exited ${String(r.exitCode)}: ${first}` };
  return { ok: true, version: first.trim() };
}

/** qemu, qemu-img and the seed ISO tool run and say their version. */
export async function checkTools(kvm: Pick<KvmConfig, 'qemuBinary' | 'qemuImgBinary' | 'isoTool'>): Promise<CheckResult[]> {
  const tools: [string, string, string, string][] = [
    ['qemu', kvm.qemuBinary, 'drivers.kvm.qemuBinary', 'qemu-system-x86'],
    ['qemu-img', kvm.qemuImgBinary, 'drivers.kvm.qemuImgBinary', 'qemu-utils'],
    ['seed tool', kvm.isoTool, 'drivers.kvm.isoTool', 'genisoimage'],
  ];
  return Promise.all(
    tools.map(async ([name, binary, field, pkg]): Promise<CheckResult> => {
      const v = await versionOf(binary, ['--version']);
      return v.ok
        ? { name, status: 'ok', detail: v.version }
        : { name, status: 'fail', detail: v.error, fix: `apt-get install ${pkg}, or set ${field} to the binary's path` };
    }),
  );
}

// ------------------------------------------------------------------ base image

/** Present, the configured format, standalone (qemu-img info); or absent with a download URL set. Never downloads. */
export async function checkBaseImage(
  kvm: Pick<KvmConfig, 'baseImage' | 'baseImageFormat' | 'baseImageUrl' | 'baseImageSha256' | 'qemuImgBinary' | 'kernel' | 'initrd'>,
): Promise<CheckResult[]> {
  const out: CheckResult[] = [];
  const name = 'base image';
  const present = await stat(kvm.baseImage).then(() => true, () => false);
  if (!present && kvm.baseImageUrl) {
    out.push({
      name,
      status: 'warn',
      detail: `${kvm.baseImage} is missing; the agent downloads it from drivers.kvm.baseImageUrl at start`,
      fix: kvm.baseImageSha256 ? 'none needed; or place the image there yourself' : 'pin the download with drivers.kvm.baseImageSha256',
    });
  } else {
    try {
      // Present (or missing without a URL): ensureBaseImage only runs qemu-img info then.
      const info = await ensureBaseImage({
        path: kvm.baseImage,
        format: kvm.baseImageFormat,
        url: undefined,
        sha256: kvm.baseImageSha256,
        qemuImgBinary: kvm.qemuImgBinary,
        logger: silentLogger,
      });
      out.push({
        name,
        status: 'ok',
        detail: `${info.path}: ${info.format}, no backing file, ${humanBytes(info.virtualSize)} virtual, ${humanBytes(info.actualSize)} on disk`,
      });
    } catch (err) {
      const msg = err instanceof Error ? err.message : String(err);
      out.push({ name, status: 'fail', detail: msg, fix: baseImageFix(err, kvm.baseImage) });
    }
  }
  for (const [label, file, field] of [['kernel', kvm.kernel, 'drivers.kvm.kernel'], ['initrd', kvm.initrd, 'drivers.kvm.initrd']] as const) {
    if (file === undefined) continue;
    const ok = await access(file, constants.R_OK).then(() => true, () => false);
    out.push(ok ? { name: label, status: 'ok', detail: file } : { name: label, status: 'fail', detail: `${file} is missing or unreadable`, fix: `put the file there or fix ${field}` });
  }
  return out;
}

function baseImageFix(err: unknown, file: string): string {
  if (!(err instanceof BaseImageError)) return 'see the message';
  switch (err.problem) {
    case 'missing':
      return `put a base image at ${file}, or set drivers.kvm.baseImageUrl and drivers.kvm.baseImageSha256`;
    case 'backing':
      return `flatten it: qemu-img convert -O qcow2 ${file} ${file}.flat && mv ${file}.flat ${file}`;
    case 'format':
      return 'set drivers.kvm.baseImageFormat to the image\'s format, or convert it with qemu-img convert';
    default:
      return 'see the message';
  }
}

// ------------------------------------------------------------------ key file

export async function checkKeyFile(keyFile: string): Promise<CheckResult> {
  const name = 'key file';
  try {
    const sk = await readKeyFile(keyFile);
    return { name, status: 'ok', detail: `${keyFile} (mode 0600) → ${npubOf(pubkeyOf(sk))}` };
  } catch (err) {
    const msg = (err as Error).message;
    const fix = /has mode/.test(msg)
      ? `chmod 600 ${keyFile}`
      : /does not exist/.test(msg)
        ? `create it with \`paygress keygen --out ${keyFile}\` (mode 0600), or point provider.keyFile / PAYGRESS_KEY_FILE at the right file`
        : 'put the provider\'s nsec (or 64 hex) alone in the file, mode 0600, owned by the agent\'s user';
    return { name, status: 'fail', detail: msg, fix };
  }
}

// ------------------------------------------------------------------ directories

/** The directory, or the nearest existing ancestor the agent would create it under, takes a new file. */
export async function checkWritableDir(label: string, field: string, dir: string): Promise<CheckResult> {
  let probe = dir;
  for (;;) {
    const st = await stat(probe).catch((e: NodeJS.ErrnoException) => e);
    if (!(st instanceof Error)) {
      if (!st.isDirectory()) {
        return { name: label, status: 'fail', detail: `${probe} is not a directory, so ${dir} cannot be used`, fix: `set ${field} to a directory path` };
      }
      break;
    }
    // ENOTDIR: some ancestor is a file; walking up finds it and says so.
    if (st.code !== 'ENOENT' && st.code !== 'ENOTDIR') {
      return { name: label, status: 'fail', detail: `${probe}: ${st.code ?? st.message}`, fix: `set ${field} to a directory the agent's user can write` };
    }
    const parent = path.dirname(probe);
    if (parent === probe) break;
    probe = parent;
  }
  try {
    // A real write, not access(2): root passes access() on a read-only mount.
    const tmp = await mkdtemp(path.join(probe, '.pga-doctor-'));
    await rm(tmp, { recursive: true, force: true });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? (err as Error).message;
    if (code === 'ENOSPC' || code === 'EDQUOT') {
      // Full is not misconfigured: the agent starts, keeps its leases, and serves again when space returns.
      return {
        name: label,
        status: 'warn',
        detail: `${probe === dir ? dir : `${probe} (parent of ${dir})`} is full (${code}): requests wait or are refused until space returns`,
        fix: `free space on the disk holding ${dir}`,
      };
    }
    return {
      name: label,
      status: 'fail',
      detail: `${probe === dir ? dir : `${probe} (parent of ${dir})`} is not writable: ${code}`,
      fix: `install -d -m 0700 -o <agent user> ${dir}, or set ${field}`,
    };
  }
  return { name: label, status: 'ok', detail: probe === dir ? `${dir} writable` : `${dir} will be created in ${probe} (writable)` };
}

// ------------------------------------------------------------------ disk space

/**
 * Free space under the VM root against the reserve and the plans. Never a
 * blocker: a full disk must not keep the agent from starting (it still has
 * leases to expire); spawns are then answered `capacity_exhausted`.
 */
export async function checkDiskSpace(vmRoot: string, reserveGb: number, plans: ReadonlyArray<{ id: string; diskGb: number }>): Promise<CheckResult> {
  const name = 'disk space';
  let free: number;
  try {
    free = freeBytesUnder(vmRoot);
  } catch (err) {
    return { name, status: 'warn', detail: `cannot read free space under ${vmRoot}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, fix: 'check drivers.kvm.vmRoot' };
  }
  const gb = (b: number) => `${(b / 1024 ** 3).toFixed(1)} GB`;
  const room = free - reserveGb * 1024 ** 3;
  const fitting = plans.filter((p) => p.diskGb * 1024 ** 3 <= room);
  const detail = `${gb(free)} free under ${vmRoot}, ${reserveGb} GB kept in reserve (limits.diskReserveGb): room for ${gb(Math.max(0, room))} of overlays`;
  if (fitting.length === plans.length) return { name, status: 'ok', detail };
  const missing = plans.filter((p) => !fitting.includes(p)).map((p) => `${p.id} (${p.diskGb} GB)`).join(', ');
  return {
    name,
    status: 'warn',
    detail: `${detail}; not even one workload of ${missing} fits: such spawns are answered capacity_exhausted`,
    fix: 'free space under drivers.kvm.vmRoot, lower limits.diskReserveGb, or offer smaller plans',
  };
}

// ------------------------------------------------------------------ ports

/** SSH ports held by this agent's own VMs (their vm.json), which are rightly in use. */
async function ownPorts(vmRoot: string): Promise<Set<number>> {
  const ports = new Set<number>();
  const entries = await readdir(vmRoot).catch(() => [] as string[]);
  for (const id of entries) {
    // The driver's own folders only (it ignores anything else under vmRoot).
    if (!isWorkloadId(id)) continue;
    const meta = await readFile(vmFile(workloadDir(vmRoot, id), 'meta'), 'utf8').catch(() => undefined);
    if (!meta) continue;
    try {
      const p = (JSON.parse(meta) as { sshPort?: unknown }).sshPort;
      if (typeof p === 'number') ports.add(p);
    } catch {
      /* a half-written vm.json is the driver's business */
    }
  }
  return ports;
}

function listRanges(ports: number[], max = 8): string {
  const shown = ports.slice(0, max).join(', ');
  return ports.length > max ? `${shown}, … (${ports.length} in all)` : shown;
}

export async function checkPorts(kvm: Pick<KvmConfig, 'bindAddress' | 'portRange' | 'vmRoot'>): Promise<CheckResult> {
  const name = 'port range';
  const { from, to } = kvm.portRange;
  const range = `${kvm.bindAddress}:${from}-${to}`;
  if (!net.isIP(kvm.bindAddress)) {
    return { name, status: 'fail', detail: `drivers.kvm.bindAddress ${JSON.stringify(kvm.bindAddress)} is not an IP address`, fix: 'set drivers.kvm.bindAddress to 0.0.0.0, 127.0.0.1 or one of the host\'s addresses' };
  }
  const own = await ownPorts(kvm.vmRoot);
  const taken: number[] = [];
  let free = 0;
  for (let p = from; p <= to; p++) {
    if (await canBind(kvm.bindAddress, p)) free++;
    else if (!own.has(p)) taken.push(p);
  }
  const total = to - from + 1;
  const mine = total - free - taken.length;
  const ownNote = mine ? `, ${mine} held by this agent's VMs` : '';
  if (free === 0) {
    return {
      name,
      status: 'fail',
      detail: `no free port in ${range}${taken.length ? `; taken by other processes: ${listRanges(taken)}` : ''}${ownNote}`,
      fix: `see who holds them (ss -ltnp 'sport >= ${from} and sport <= ${to}'), or move drivers.kvm.portRange to a free range`,
    };
  }
  if (taken.length) {
    return {
      name,
      status: 'warn',
      detail: `${free} of ${total} free in ${range}; taken by other processes: ${listRanges(taken)}${ownNote}`,
      fix: `the driver skips taken ports, but a range shared with another service runs out unexpectedly: see ss -ltnp, or move drivers.kvm.portRange`,
    };
  }
  return { name, status: 'ok', detail: `${free} of ${total} free in ${range}${ownNote}` };
}

// ------------------------------------------------------------------ relays

/** Connect, send a REQ like the agent's (kinds 1059 and 4, limit 1) and wait for EOSE. */
export function probeRelay(url: string, timeoutMs = 5_000): Promise<{ ok: boolean; ms: number; detail: string }> {
  const started = performance.now();
  const ms = () => Math.round(performance.now() - started);
  return new Promise((resolve) => {
    let done = false;
    let ws: WebSocket;
    const finish = (ok: boolean, detail: string) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      try {
        ws.terminate();
      } catch {
        /* already closed */
      }
      resolve({ ok, ms: ms(), detail });
    };
    const timer = setTimeout(() => finish(false, `no EOSE within ${timeoutMs} ms`), timeoutMs);
    const subId = `doctor-${Math.random().toString(36).slice(2, 10)}`;
    try {
      ws = new WebSocket(url, { handshakeTimeout: timeoutMs });
    } catch (err) {
      clearTimeout(timer);
      resolve({ ok: false, ms: ms(), detail: (err as Error).message });
      return;
    }
    ws.on('open', () => ws.send(JSON.stringify(['REQ', subId, { kinds: [1059, 4], limit: 1 }])));
    ws.on('message', (data) => {
      let msg: unknown;
      try {
        msg = JSON.parse(String(data));
      } catch {
        return;
      }
      if (!Array.isArray(msg) || msg[1] !== subId) return;
      if (msg[0] === 'EOSE') finish(true, `connected, REQ answered with EOSE in ${ms()} ms`);
      else if (msg[0] === 'CLOSED') finish(false, `relay closed the subscription: ${String(msg[2] ?? '')}`);
    });
    ws.on('error', (err: NodeJS.ErrnoException) => finish(false, err.code ? `${err.code}: ${err.message}` : err.message));
    ws.on('close', (code) => finish(false, `connection closed (${code}) before EOSE`));
  });
}

/** One row per relay; a down relay is a blocker only when every relay is down. */
export async function checkRelays(urls: readonly string[], timeoutMs?: number): Promise<CheckResult[]> {
  const probes = await Promise.all(urls.map((u) => probeRelay(u, timeoutMs)));
  const anyUp = probes.some((p) => p.ok);
  return probes.map((p, i) =>
    p.ok
      ? { name: `relay ${urls[i]}`, status: 'ok', detail: p.detail }
      : {
          name: `relay ${urls[i]}`,
          status: anyUp ? 'warn' : 'fail',
          detail: `unreachable: ${p.detail}`,
          fix: anyUp
            ? 'the agent keeps retrying it and works through the other relays; check the URL or remove it from relays'
            : 'no relay answers: check the host\'s network/DNS/firewall and the URLs in relays',
        },
  );
}

// ------------------------------------------------------------------ public host

const PLACEHOLDER_HOST = [
  /^192\.0\.2\.\d+$/, /^198\.51\.100\.\d+$/, /^203\.0\.113\.\d+$/, // RFC 5737 documentation ranges
  /^2001:db8:/i, // RFC 3849
  /(^|\.)example(\.(com|net|org))?$/i, /\.(invalid|test)$/i, // RFC 2606
];
const LOOPBACK = [/^127\./, /^::1$/, /^localhost$/i];
const PRIVATE = [/^10\./, /^192\.168\./, /^172\.(1[6-9]|2\d|3[01])\./, /^f[cd][0-9a-f]{2}:/i, /^169\.254\./];

/** The address consumers get in every reply: set, not a documentation placeholder, reachable given bindAddress. */
export function checkPublicHost(publicHost: string, bindAddress: string | undefined): CheckResult {
  const name = 'public host';
  const h = publicHost.trim();
  const fixField = 'set provider.publicHost to this host\'s public IP address or DNS name';
  if (!h) return { name, status: 'fail', detail: 'provider.publicHost is empty', fix: fixField };
  if (PLACEHOLDER_HOST.some((re) => re.test(h))) {
    return { name, status: 'fail', detail: `${h} is a documentation placeholder (from the example config); consumers would be sent there`, fix: fixField };
  }
  const loopBind = bindAddress !== undefined && /^127\.|^::1$/.test(bindAddress);
  if (LOOPBACK.some((re) => re.test(h))) {
    return { name, status: 'warn', detail: `${h} is loopback: only consumers on this host can connect`, fix: `${fixField} (fine for a local test)` };
  }
  if (loopBind) {
    return { name, status: 'warn', detail: `${h}, but drivers.kvm.bindAddress is ${bindAddress ?? ''}: SSH ports listen on loopback only`, fix: 'set drivers.kvm.bindAddress to 0.0.0.0 or the address consumers reach' };
  }
  if (PRIVATE.some((re) => re.test(h))) {
    return { name, status: 'warn', detail: `${h} is a private address: reachable only from its network`, fix: `${fixField}, unless consumers are on the same network` };
  }
  return { name, status: 'ok', detail: h };
}
