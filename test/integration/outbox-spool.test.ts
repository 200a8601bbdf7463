/**
 * The reply spool is bounded: during a relay outage the oldest waiting
 * messages are dropped first, and a spool file that cannot be written (full
 * disk) does not lose the message from memory, but the send says it is not
 * safe. A message carrying money is never dropped, and the spool never holds
 * plaintext.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { generateSecretKey, getPublicKey } from 'nostr-tools/pure';
import { RelayPool } from '../../src/nostr/relays.js';
import { errorReply } from '../../src/protocol/replies.js';
import { NostrOutbox } from '../../src/service/nostr-outbox.js';
import { silentLogger } from '../../src/util/logger.js';
import { mountTmpfs, type Tmpfs } from '../support/tmpfs.js';

/** Nothing listens here (this file's port range: 47200-47209): no relay ever accepts. */
const DEAD_RELAY = 'ws://127.0.0.1:47201';

const cleanup: Array<() => unknown> = [];
afterEach(async () => {
  for (const c of cleanup.splice(0).reverse()) await c();
});

function setup(fs: Tmpfs, opts: { maxWaiting?: number; maxWaitingBytes?: number; retryForMs?: number }) {
  const pool = new RelayPool({ urls: [DEAD_RELAY], logger: silentLogger, publishTimeoutMs: 50 });
  const spoolDir = join(fs.dir, 'outbox');
  const outbox = new NostrOutbox({ sk: generateSecretKey(), pool, logger: silentLogger, spoolDir, ...opts });
  cleanup.push(() => pool.close(), () => outbox.close());
  return { outbox, spoolDir };
}

const to = getPublicKey(generateSecretKey());
const message = (n: number) => errorReply(n.toString(16).padStart(64, '0'), 'busy', 'x'.repeat(100));
const refusal = (n: number) => ({ ...errorReply(n.toString(16).padStart(64, '0'), 'spawn_failed', 'x'.repeat(100)), refund_msats: 1000, refund_token: `cashuBrefund${n}secret` });
const route = (m: { request_id: string }) => ({ to, channel: 'nip17', replyTo: m.request_id });
const spooledRequestIds = (dir: string) =>
  readdirSync(dir).map((f) => (JSON.parse(readFileSync(join(dir, f), 'utf8')) as { route: { replyTo: string } }).route.replyTo).sort();

describe('reply spool bounds', () => {
  let fs: Tmpfs;
  afterEach(() => fs?.unmount());

  it('keeps at most maxWaiting messages, dropping the oldest first', async () => {
    fs = mountTmpfs(1024);
    const { outbox, spoolDir } = setup(fs, { maxWaiting: 4 });
    for (let n = 0; n < 10; n++) await outbox.send(route(message(n)), message(n));
    expect(outbox.waitingCount).toBe(4);
    expect(spooledRequestIds(spoolDir)).toEqual([6, 7, 8, 9].map((n) => message(n).request_id));
  });

  it('keeps at most maxWaitingBytes of messages', async () => {
    fs = mountTmpfs(1024);
    const { outbox, spoolDir } = setup(fs, { maxWaitingBytes: 10_000 });
    for (let n = 0; n < 20; n++) await outbox.send(route(message(n)), message(n));
    const kept = spooledRequestIds(spoolDir);
    expect(kept.length).toBeGreaterThan(0);
    expect(kept.length).toBeLessThan(20);
    expect(kept).toContain(message(19).request_id);
    const bytes = readdirSync(spoolDir).reduce((sum, f) => sum + readFileSync(join(spoolDir, f)).length, 0);
    expect(bytes).toBeLessThanOrEqual(10_000);
  });

  it('holds a message in memory when the spool cannot be written (the send rejects: not safe), and spools later ones once space is back', async () => {
    fs = mountTmpfs(256);
    const { outbox, spoolDir } = setup(fs, {});
    fs.fill();
    await expect(outbox.send(route(message(1)), message(1))).rejects.toThrow(/memory only/);
    expect(outbox.waitingCount).toBe(1);
    expect(readdirSync(spoolDir)).toEqual([]);
    fs.free();
    await outbox.send(route(message(2)), message(2));
    expect(outbox.waitingCount).toBe(2);
    expect(spooledRequestIds(spoolDir)).toEqual([message(2).request_id]);
  });

  it('never drops a message carrying money to keep the bound; a plain one that would be dropped at once is refused', async () => {
    fs = mountTmpfs(1024);
    const { outbox, spoolDir } = setup(fs, { maxWaiting: 2 });
    await outbox.send(route(refusal(1)), refusal(1));
    await outbox.send(route(refusal(2)), refusal(2));
    await expect(outbox.send(route(message(3)), message(3))).rejects.toThrow();
    expect(spooledRequestIds(spoolDir)).toEqual([1, 2].map((n) => refusal(n).request_id));
  });

  it('keeps retrying a message carrying money past its deadline, also after a restart', async () => {
    fs = mountTmpfs(1024);
    const { outbox, spoolDir } = setup(fs, { retryForMs: 0 });
    await expect(outbox.send(route(message(1)), message(1))).rejects.toThrow();
    await outbox.send(route(refusal(2)), refusal(2));
    expect(spooledRequestIds(spoolDir)).toEqual([refusal(2).request_id]);
    outbox.close();
    const next = setup(fs, { retryForMs: 0 });
    expect(next.outbox.resume()).toBe(1);
    expect(spooledRequestIds(spoolDir)).toEqual([refusal(2).request_id]);
  });

  it('spools the sealed event only, never the plaintext message', async () => {
    fs = mountTmpfs(1024);
    const { outbox, spoolDir } = setup(fs, {});
    await outbox.send(route(refusal(1)), refusal(1));
    const [file] = readdirSync(spoolDir);
    const text = readFileSync(join(spoolDir, file!), 'utf8');
    expect(text).not.toContain('cashuBrefund1secret');
    expect(text).not.toContain('refund_token');
    expect(text).not.toContain('spawn_failed');
  });
});
