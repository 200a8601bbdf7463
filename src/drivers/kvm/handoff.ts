/**
 * Giving an idle warm-pool VM to its tenant, through the qemu guest agent:
 * root's password (as its SHA-512 crypt hash), root's SSH keys, the hostname;
 * then the check that password login is open (the sshd drop-in the seed wrote
 * is in place, and sshd answers with a banner). Afterwards the channel is
 * taken out of the VM for good (`closeGuestAgentChannel`).
 *
 * Knows the guest agent and QMP, not the driver's bookkeeping: driver.ts
 * decides whether a VM may be handed off and marks it.
 */
import { rm } from 'node:fs/promises';
import { SHA512_CRYPT_RE, SSHD_DROPIN_CONTENT, SSHD_DROPIN_PATH } from './cloud-config.js';
import { removeGuestAgentChannel } from './argv.js';
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
import { shadowDay, withRootPasswordHash } from './shadow.js';

export interface TenantAccess {
  hostname: string;
  /** `$6$` crypt hash; the plaintext never reaches this module. */
  passwordHash: string;
  sshKeys: readonly string[];
}

/** Most a single guest-agent command may take; each takes tens of ms under TCG. */
export const DEFAULT_COMMAND_TIMEOUT_MS = 5_000;

/** Bytes of the drop-in read back; the real one is ~50. */
const DROPIN_READ_MAX = 4096;
/** A VM's /etc/shadow holds a few dozen system accounts (~1 KiB in a stock image). */
const SHADOW_READ_MAX = 16 * 1024;

/** Per-step milliseconds of one hand-off, for logs and the bench. */
export type HandOffTimings = Record<string, number>;

/**
 * Run the hand-off's guest-agent commands on an open session. Every answer
 * is checked for its shape; anything else throws GuestAgentError.
 *
 * Root's password goes into /etc/shadow through guest-file-* (read, edit,
 * write back): guest-set-user-password would have qemu-ga spawn `chpasswd
 * -e`, several times slower under TCG. Either way the guest only ever gets
 * the hash.
 */
export async function configureTenant(
  session: GuestAgentSession,
  tenant: TenantAccess,
  opts: { deadline: number; commandTimeoutMs?: number; earlierSyncIds?: Set<number> },
  timings: HandOffTimings = {},
): Promise<void> {
  // Validated before anything is sent: a bad value is a caller's bug, not the guest's.
  const hostname = assertHostname(tenant.hostname);
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
  const expectEmpty = async (what: string, value: Promise<unknown>) => {
    if (!isEmptyReturn(await value)) throw new GuestAgentError('lie', `${what}: unexpected answer`);
  };

  await step('sync', () => session.sync(budget(), opts.earlierSyncIds));
  await step('password', async () => {
    const shadow = await readGuestFile(session, '/etc/shadow', SHADOW_READ_MAX, budget);
    const updated = withRootPasswordHash(shadow.toString('utf8'), tenant.passwordHash, shadowDay(Date.now()));
    if (updated === undefined) throw new GuestAgentError('lie', '/etc/shadow has no single well-formed root entry');
    await writeGuestFile(session, '/etc/shadow', Buffer.from(updated, 'utf8'), budget);
  });
  await step('keys', () => expectEmpty('guest-ssh-add-authorized-keys', session.call(keys, budget())));
  // /proc/sys/kernel/hostname is the running hostname: no program to spawn.
  await step('hostname', async () => {
    await writeGuestFile(session, '/etc/hostname', Buffer.from(`${hostname}\n`), budget);
    await writeGuestFile(session, '/proc/sys/kernel/hostname', Buffer.from(hostname), budget);
  });
  await step('sshd-check', async () => {
    const dropin = await readGuestFile(session, SSHD_DROPIN_PATH, DROPIN_READ_MAX, budget);
    if (dropin.toString('utf8') !== SSHD_DROPIN_CONTENT) {
      throw new GuestAgentError('lie', `${SSHD_DROPIN_PATH} does not hold the settings that open root password login`);
    }
  });
}

async function writeGuestFile(session: GuestAgentSession, path: string, data: Buffer, budget: () => number): Promise<void> {
  const handle = fileHandleOf(await session.call(fileOpen(path, 'w'), budget()));
  if (handle === undefined) throw new GuestAgentError('lie', 'guest-file-open: no handle');
  const written = writtenCountOf(await session.call(fileWrite(handle, data), budget()));
  if (written !== data.length) throw new GuestAgentError('lie', `guest-file-write: ${written === undefined ? 'no count' : 'short write'}`);
  // Closing flushes: an error here means the write may not have landed.
  if (!isEmptyReturn(await session.call(fileClose(handle), budget()))) throw new GuestAgentError('lie', 'guest-file-close: unexpected answer');
}

async function readGuestFile(session: GuestAgentSession, path: string, max: number, budget: () => number): Promise<Buffer> {
  const handle = fileHandleOf(await session.call(fileOpen(path, 'r'), budget()));
  if (handle === undefined) throw new GuestAgentError('lie', 'guest-file-open: no handle');
  // One read of one more byte than allowed: a file that long is not ours.
  const read = readBytesOf(await session.call(fileRead(handle, max + 1), budget()), max + 1);
  if (!read) throw new GuestAgentError('lie', 'guest-file-read: malformed answer');
  if (read.data.length > max || !read.eof) throw new GuestAgentError('lie', 'guest-file-read: file too long');
  if (!isEmptyReturn(await session.call(fileClose(handle), budget()))) throw new GuestAgentError('lie', 'guest-file-close: unexpected answer');
  return read.data;
}

/**
 * Take the guest-agent channel out of the VM: nobody can connect to it any
 * more once the socket file is gone (done first, it is instant), and the
 * port and chardev are removed from the running qemu. The port's unplug
 * finishes asynchronously, and until it has, qemu calls the chardev busy: the
 * removal is retried until `timeoutMs`. Resolves true when qemu confirmed
 * both removals; false (socket unlinked only) otherwise.
 */
export async function closeGuestAgentChannel(qgaSocket: string, qmpSocket: string, timeoutMs: number): Promise<boolean> {
  await rm(qgaSocket, { force: true });
  const deadline = Date.now() + timeoutMs;
  const [unplug, removeChardev] = removeGuestAgentChannel() as [ReturnType<typeof removeGuestAgentChannel>[number], ReturnType<typeof removeGuestAgentChannel>[number]];
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
