/**
 * UnwrapPool: the same answers as openDm whether an event is opened on the
 * main thread or in a worker, workers only under a backlog, recovery from a
 * dead worker, and no thread left behind by close(). Real worker threads
 * (the .ts entry under tsx's loader); no timing assertions.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { finalizeEvent, generateSecretKey, getPublicKey } from 'nostr-tools/pure';
import * as nip04 from 'nostr-tools/nip04';
import { createRumor, createSeal, createWrap } from 'nostr-tools/nip59';
import { openDm, sealDm, type OpenResult } from '../../src/nostr/dm.js';
import type { NostrEvent } from '../../src/nostr/types.js';
import { UnwrapPool } from '../../src/nostr/unwrap-pool.js';

const me = generateSecretKey();
const mePub = getPublicKey(me);
const alice = generateSecretKey();

/** What a relay would hand us: a plain JSON copy with no cached verification flag. */
const wire = (ev: NostrEvent): NostrEvent => JSON.parse(JSON.stringify(ev)) as NostrEvent;

const pools: UnwrapPool[] = [];
function pool(opts: { size?: number; minBacklog?: number; idleMs?: number } = {}): UnwrapPool {
  const p = new UnwrapPool({ sk: me, pubkey: mePub, ...opts });
  pools.push(p);
  return p;
}
afterEach(async () => {
  await Promise.all(pools.splice(0).map((p) => p.close()));
});

/**
 * Starting a worker (tsx's loader, nostr-tools and the WASM verifier, in a new
 * thread) costs far more than the events these tests open, so the tests that
 * only need warm workers share one flood pool; the last test closes it.
 */
let busy: UnwrapPool;
beforeAll(() => {
  busy = new UnwrapPool({ sk: me, pubkey: mePub, minBacklog: 0, size: 2 });
});
afterAll(() => busy.close());

/** Valid wraps and DMs from many senders, with arbitrary (also non-ASCII) content. */
function validEvents(contents: string[]): NostrEvent[] {
  return contents.map((content, i) =>
    wire(sealDm({ sk: generateSecretKey(), recipient: mePub, content, channel: i % 5 === 4 ? 'nip04' : 'nip17' })),
  );
}

/** One of each way an event can fail to open, each with the reason openDm gives. */
function forgeries(): { event: NostrEvent; reason: string }[] {
  const wrap = wire(sealDm({ sk: alice, recipient: mePub, content: 'x', channel: 'nip17' }));
  const flip = (s: string): string => (s[0] === '0' ? '1' : '0') + s.slice(1);
  const bob = generateSecretKey();
  const forgedRumor = createRumor({ kind: 14, content: 'I am bob', tags: [['p', mePub]] }, bob);
  const badSeal = { ...wire(createSeal(createRumor({ kind: 14, content: 'x', tags: [] }, alice), alice, mePub)), sig: '00'.repeat(64) };
  const eph = generateSecretKey();
  const retagged = finalizeEvent({ kind: 1059, created_at: wrap.created_at, tags: [['p', mePub]], content: wrap.content }, eph);
  const other = getPublicKey(generateSecretKey());
  return [
    { event: { ...wrap, sig: flip(wrap.sig) }, reason: 'bad_signature' },
    { event: wire(createWrap(badSeal, mePub)), reason: 'bad_signature' },
    { event: wire(createWrap(createSeal(forgedRumor, alice, mePub), mePub)), reason: 'forged_sender' },
    { event: wire(retagged), reason: 'decrypt_failed' },
    { event: wire(sealDm({ sk: alice, recipient: other, content: 'x', channel: 'nip17' })), reason: 'not_for_us' },
    { event: wire(finalizeEvent({ kind: 1, created_at: 1, tags: [['p', mePub]], content: 'x' }, alice)), reason: 'unsupported_kind' },
    { event: { ...wrap, id: 'nope' }, reason: 'bad_shape' },
    {
      event: wire(finalizeEvent({ kind: 4, created_at: 1, tags: [['p', mePub]], content: `${nip04.encrypt(alice, mePub, 'x').split('?iv=')[0]}?iv=AAAA` }, alice)),
      reason: 'decrypt_failed',
    },
  ];
}

async function waitFor(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 2_000 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
  if (!cond()) throw new Error(`timed out waiting for ${what}`);
}

describe('UnwrapPool', () => {
  it('answers exactly as openDm on random valid events, on the main thread and in workers', async () => {
    // Each range of UTF-8 lengths, a NUL and a lone surrogate for sure, then random code points.
    const classes = ['a', 'é', '中文', '😀', '\u0000', 'x\ud800y'];
    const contents = [...classes, ...fc.sample(fc.string({ unit: 'binary', minLength: 1, maxLength: 300 }), 18)];
    const events = validEvents(contents);
    const expected = events.map((e) => openDm(wire(e), me, mePub));
    expect(expected.every((r) => r.ok)).toBe(true);

    // Quiet: one at a time never builds a backlog.
    const quiet = pool({ minBacklog: 4 });
    const one: OpenResult[] = [];
    for (const e of events) one.push(await quiet.open(wire(e)));
    expect(one).toEqual(expected);
    expect(quiet.stats().workersStarted).toBe(0);

    // Flood: all at once, past the backlog, so workers open most of them.
    const before = busy.stats();
    const all = await Promise.all(events.map((e) => busy.open(wire(e))));
    expect(all).toEqual(expected);
    expect(JSON.stringify(all)).toBe(JSON.stringify(expected));
    const s = busy.stats();
    expect(s.workersStarted).toBe(2);
    expect(s.openedInWorkers).toBeGreaterThan(before.openedInWorkers);
    expect(s.openedInWorkers + s.openedOnMain - before.openedInWorkers - before.openedOnMain).toBe(events.length);
  });

  it('rejects forgeries with the same reasons as openDm, in workers too', async () => {
    const forged = forgeries();
    for (const f of forged) expect(openDm(wire(f.event), me, mePub)).toEqual({ ok: false, reason: f.reason });
    const before = busy.stats();
    // Valid events around them keep the workers busy and prove forgeries do not disturb them.
    const mixed = [...forged.map((f) => f.event), ...validEvents(['a', 'b', 'c', 'd'])];
    const results = await Promise.all(mixed.map((e) => busy.open(wire(e))));
    expect(results.slice(0, forged.length)).toEqual(forged.map((f) => ({ ok: false, reason: f.reason })));
    expect(results.slice(forged.length).every((r) => r.ok)).toBe(true);
    expect(busy.stats().openedInWorkers).toBeGreaterThan(before.openedInWorkers);
    expect(busy.stats().crashes).toBe(0);
  });

  it('an event no structured clone can copy (an unsigned 20 000-deep field) is opened anyway, on the main thread', async () => {
    const before = busy.stats();
    const deep = JSON.parse('['.repeat(20_000) + ']'.repeat(20_000)) as unknown;
    const events = validEvents(['a', 'b', 'c', 'd', 'e', 'f']).map((e, i) => (i % 2 === 0 ? Object.assign(wire(e), { extra: deep }) : wire(e)));
    const results = await Promise.all(events.map((e) => busy.open(e)));
    expect(results.every((r) => r.ok)).toBe(true);
    expect(busy.stats().openedOnMain - before.openedOnMain).toBeGreaterThanOrEqual(3);
    expect(busy.stats().crashes).toBe(0);
  });

  it('starts no worker until more than minBacklog events wait; it ends after the idle time and starts again on the next backlog', async () => {
    const p = pool({ minBacklog: 6, size: 1, idleMs: 50 });
    const events = validEvents(Array.from({ length: 20 }, (_, i) => `m${i}`));
    // 6 waiting at once is not more than 6: still the main thread.
    await Promise.all(events.slice(0, 6).map((e) => p.open(e)));
    expect(p.stats()).toMatchObject({ workers: 0, workersStarted: 0, openedOnMain: 6 });
    // 14 at once is: one worker starts.
    const rest = await Promise.all(events.slice(6).map((e) => p.open(e)));
    expect(rest.every((r) => r.ok)).toBe(true);
    expect(p.stats().workersStarted).toBe(1);
    expect(p.stats().openedInWorkers).toBeGreaterThan(0);
    await waitFor(() => p.stats().workers === 0, 'idle workers to end');
    expect(p.stats().crashes).toBe(0);
    // After the flood ended, a backlog starts a worker again.
    const again = await Promise.all(events.slice(6).map((e) => p.open(wire(e))));
    expect(again.every((r) => r.ok)).toBe(true);
    expect(p.stats().workersStarted).toBe(2);
  });

  it('a dead worker is replaced and the events it held are opened once, on the main thread', async () => {
    const p = pool({ minBacklog: 0, size: 1 });
    const events = validEvents(Array.from({ length: 60 }, (_, i) => `crash-${i}`));
    const expected = events.map((e) => openDm(wire(e), me, mePub));
    let settled = 0;
    const all = Promise.all(
      events.map((e) =>
        p.open(wire(e)).then((r) => {
          settled++;
          return r;
        }),
      ),
    );
    // Kill a worker once workers hold events.
    await waitFor(() => p.stats().openedInWorkers > 0, 'a first answer from a worker');
    expect(await p.crashOneWorkerForTest()).toBe(true);
    const results = await all;
    expect(settled).toBe(events.length);
    expect(results).toEqual(expected);
    const s = p.stats();
    expect(s.crashes).toBe(1);
    expect(s.retriedOnMain).toBeGreaterThan(0);
    expect(s.workersStarted).toBe(2);
    expect(s.openedInWorkers + s.openedOnMain).toBe(events.length);
    expect(s.pending).toBe(0);
  });

  // Last: it closes the shared pool.
  it('close() lets accepted events settle, ends every worker, and opens later events on the main thread', async () => {
    const p = busy;
    const events = validEvents(Array.from({ length: 12 }, (_, i) => `close-${i}`));
    const all = Promise.all(events.map((e) => p.open(wire(e))));
    await p.close();
    expect((await all).every((r) => r.ok)).toBe(true);
    expect(p.stats()).toMatchObject({ workers: 0, pending: 0, crashes: 0, workersStarted: 2 });
    const late = await p.open(wire(events[0]!));
    expect(late).toEqual(openDm(wire(events[0]!), me, mePub));
    expect(p.stats().workersStarted).toBe(2);
  });
});
