/**
 * Giving an idle warm-pool VM to its tenant, through the qemu guest agent:
 * root's password (as its SHA-512 crypt hash), root's SSH keys, the hostname;
 * and the check that password login is open: the sshd drop-in the seed wrote
 * is in place and sshd listens on port 22 (read from the guest's
 * /proc/net/tcp; the host-side banner was seen when the VM became idle, and
 * probing it again is slow, since sshd forks and re-executes itself per
 * connection: docs/guest-images.md). Afterwards the channel is taken out of
 * the VM for good (`removeGuestAgentPort`).
 *
 * Knows the guest agent and QMP, not the driver's bookkeeping: driver.ts
 * decides whether a VM may be handed off and marks it.
 */
import { SHA512_CRYPT_RE, SSHD_DROPIN_CONTENT, SSHD_DROPIN_PATH } from './cloud-config.js';
import { removeGuestAgentChannel, type QmpCommand } from './argv.js';
import {
  assertHostname,
  fileClose,
  fileHandleOf,
  fileOpen,
  fileRead,
  fileWrite,
  isEmptyReturn,
  readBytesOf,
  setRootAuthorizedKeys,
  writtenCountOf,
} from './guest-agent-protocol.js';
import { GuestAgentError, GuestAgentSession } from './guest-agent.js';
import { runQmp } from './qmp.js';
import { listensOnPort } from './proc-net.js';
import { shadowDay, withRootPasswordHash } from './shadow.js';

export interface TenantAccess {
  hostname: string;
  /** `$6$` crypt hash; the plaintext never reaches this module. */
  passwordHash: string;
  sshKeys: readonly string[];
}

/** Most a single guest-agent command may take: far above what one takes (docs/guest-images.md), so only a hang hits it. */
const DEFAULT_COMMAND_TIMEOUT_MS = 5_000;

/** Bytes of the drop-in read back: room for far more than the real one. */
const DROPIN_READ_MAX = 4096;
/** Room for a stock image's /etc/shadow (a few dozen system accounts) many times over. */
const SHADOW_READ_MAX = 16 * 1024;
/** Room for /proc/net/tcp of an idle VM (a handful of sockets) many times over. */
const PROC_NET_READ_MAX = 16 * 1024;

/** Per-step milliseconds of one hand-off, for logs and the bench. */
export type HandOffTimings = Record<string, number>;

/** Throws RangeError unless the tenant's hostname and keys can be sent as they are (checked again, the same way, before sending). */
export function checkTenantAccess(tenant: Pick<TenantAccess, 'hostname' | 'sshKeys'>): void {
  assertHostname(tenant.hostname);
  setRootAuthorizedKeys(tenant.sshKeys);
}

/**
 * Run the hand-off's guest-agent commands on an open session. Every answer
 * is checked for its shape; anything else throws GuestAgentError.
 *
 * Root's password goes into /etc/shadow through guest-file-* (read, edit,
 * write back): guest-set-user-password would have qemu-ga spawn `chpasswd
 * -e`, several times slower (docs/guest-images.md). Either way the guest only ever gets
 * the hash. Commands that need nothing from each other go in one batch (one
 * round trip each): sync; open everything; read/write/close; write shadow.
 */
export async function configureTenant(
  session: GuestAgentSession,
  tenant: TenantAccess,
  opts: { deadline: number; commandTimeoutMs?: number; earlierSyncIds?: Set<number> },
  timings: HandOffTimings = {},
): Promise<void> {
  // Validated before anything is sent: a bad value is a caller's bug, not the guest's.
  const hostname = Buffer.from(assertHostname(tenant.hostname));
  if (!SHA512_CRYPT_RE.test(tenant.passwordHash)) throw new RangeError('passwordHash must be a SHA-512 crypt hash');
  const keys = setRootAuthorizedKeys(tenant.sshKeys);
  const budget = () => {
    const left = opts.deadline - Date.now();
    if (left <= 0) throw new GuestAgentError('timeout', 'hand-off deadline passed');
    return Math.min(left, opts.commandTimeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS);
  };
  const step = async <T>(name: string, fn: () => Promise<T>): Promise<T> => {
    const t = performance.now();
    const r = await fn();
    timings[name] = Math.round(performance.now() - t);
    return r;
  };

  await step('sync', () => session.sync(budget(), opts.earlierSyncIds));

  // /proc/sys/kernel/hostname is the running hostname: no program to spawn.
  const reads = { shadow: '/etc/shadow', dropin: SSHD_DROPIN_PATH, tcp: '/proc/net/tcp' } as const;
  const writes = { etcHostname: '/etc/hostname', kernelHostname: '/proc/sys/kernel/hostname' } as const;
  const readNames = Object.keys(reads) as (keyof typeof reads)[];
  const writeNames = Object.keys(writes) as (keyof typeof writes)[];
  const opened = await step('open', () =>
    session.callAll([...readNames.map((n) => fileOpen(reads[n], 'r')), ...writeNames.map((n) => fileOpen(writes[n], 'w')), keys], budget()),
  );
  const handles = opened.slice(0, -1).map((v, i) => {
    const h = fileHandleOf(v);
    if (h === undefined) throw new GuestAgentError('lie', `guest-file-open ${[...readNames, ...writeNames][i]}: no handle`);
    return h;
  });
  if (!isEmptyReturn(opened.at(-1))) throw new GuestAgentError('lie', 'guest-ssh-add-authorized-keys: unexpected answer');
  const handleOf = (name: string) => handles[[...readNames, ...writeNames].indexOf(name as never)]!;
  const written = { etcHostname: Buffer.concat([hostname, Buffer.from('\n')]), kernelHostname: hostname };

  // One read of one more byte than allowed: a file that long is not what we expect.
  const limits: Record<keyof typeof reads, number> = { shadow: SHADOW_READ_MAX, dropin: DROPIN_READ_MAX, tcp: PROC_NET_READ_MAX };
  const answers = await step('read-write', () =>
    session.callAll(
      [
        ...readNames.map((n) => fileRead(handleOf(n), limits[n] + 1)),
        ...writeNames.map((n) => fileWrite(handleOf(n), written[n])),
        // Closing flushes: an error here means a write may not have landed.
        ...handles.map((h) => fileClose(h)),
      ],
      budget(),
    ),
  );
  const content: Partial<Record<keyof typeof reads, string>> = {};
  readNames.forEach((n, i) => {
    const read = readBytesOf(answers[i], limits[n] + 1);
    if (!read) throw new GuestAgentError('lie', `guest-file-read ${reads[n]}: malformed answer`);
    if (read.data.length > limits[n] || !read.eof) throw new GuestAgentError('lie', `guest-file-read ${reads[n]}: file too long`);
    content[n] = read.data.toString('utf8');
  });
  writeNames.forEach((n, i) => {
    if (writtenCountOf(answers[readNames.length + i]) !== written[n].length) throw new GuestAgentError('lie', `guest-file-write ${writes[n]}: short write`);
  });
  if (!answers.slice(readNames.length + writeNames.length).every(isEmptyReturn)) throw new GuestAgentError('lie', 'guest-file-close: unexpected answer');

  // Login must be open before the tenant is told so: the seed's sshd settings, and sshd listening.
  if (content.dropin !== SSHD_DROPIN_CONTENT) {
    throw new GuestAgentError('lie', `${SSHD_DROPIN_PATH} does not hold the settings that open root password login`);
  }
  // IPv4: what the host's forward (slirp or the tap's DNAT) reaches.
  if (!listensOnPort(content.tcp!, 22)) throw new GuestAgentError('lie', 'nothing listens on port 22 in the guest');

  const shadow = withRootPasswordHash(content.shadow!, tenant.passwordHash, shadowDay(Date.now()));
  if (shadow === undefined) throw new GuestAgentError('lie', '/etc/shadow has no single well-formed root entry');
  const data = Buffer.from(shadow, 'utf8');
  await step('password', async () => {
    const handle = fileHandleOf(await session.call(fileOpen('/etc/shadow', 'w'), budget()));
    if (handle === undefined) throw new GuestAgentError('lie', 'guest-file-open /etc/shadow: no handle');
    const [w, c] = await session.callAll([fileWrite(handle, data), fileClose(handle)], budget());
    if (writtenCountOf(w) !== data.length) throw new GuestAgentError('lie', 'guest-file-write /etc/shadow: short write');
    if (!isEmptyReturn(c)) throw new GuestAgentError('lie', 'guest-file-close: unexpected answer');
  });
}

/**
 * Take the guest-agent port and its chardev out of the running qemu (the
 * caller has already unlinked the socket file, so nobody can connect any
 * more). The port's unplug finishes asynchronously, and until it has, qemu
 * calls the chardev busy: its removal is retried until `timeoutMs`. Resolves
 * true once qemu confirmed both, false otherwise.
 */
export async function removeGuestAgentPort(qmpSocket: string, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  const [unplug, removeChardev] = removeGuestAgentChannel() as [QmpCommand, QmpCommand];
  try {
    await runQmp(qmpSocket, [unplug], timeoutMs);
  } catch {
    return false;
  }
  for (let wait = 5; ; wait = Math.min(wait * 2, 100)) {
    try {
      await runQmp(qmpSocket, [removeChardev], Math.max(1, deadline - Date.now()));
      return true;
    } catch {
      if (Date.now() + wait >= deadline) return false;
      await new Promise((r) => setTimeout(r, wait));
    }
  }
}
