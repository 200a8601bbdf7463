/**
 * RelayPool against real relays (test/support/relay.ts) on 127.0.0.1, plus one
 * hostile hand-written server for frames no real relay would send.
 *
 * Ordering, not timing: to know that a relay has delivered everything it is
 * going to, tests open a throwaway subscription and wait for its EOSE on the
 * same connection; frames on one connection arrive in order.
 */
import { afterEach, describe, expect, it } from 'vitest';
import WebSocket, { WebSocketServer } from 'ws';
import type { AddressInfo } from 'node:net';
import { finalizeEvent, generateSecretKey, getPublicKey } from 'nostr-tools/pure';
import { silentLogger } from '../../src/util/logger.js';
import { PublishError, RelayPool, type Filter } from '../../src/nostr/relays.js';
import type { NostrEvent } from '../../src/nostr/types.js';
import { startRelay, type LocalRelay } from '../support/relay.js';

const now = (): number => Math.floor(Date.now() / 1000);
const author = generateSecretKey();

function note(opts: { p?: string; createdAt?: number; content?: string; kind?: number } = {}): NostrEvent {
  return finalizeEvent(
    {
      kind: opts.kind ?? 1059,
      created_at: opts.createdAt ?? now(),
      tags: opts.p ? [['p', opts.p]] : [],
      content: opts.content ?? Math.random().toString(36),
    },
    author,
  );
}

async function waitFor(cond: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Resolves when every given relay has sent EOSE for a fresh subscription on the pool's current connections. */
function barrier(pool: RelayPool, urls: string[]): Promise<void> {
  return new Promise((resolve) => {
    const left = new Set(urls);
    const sub = pool.subscribe([{ ids: ['0'.repeat(64)] }], () => {}, {
      onEose: (url) => {
        left.delete(url);
        if (left.size === 0) {
          sub.close();
          resolve();
        }
      },
    });
  });
}

/** A bare client: publish one event and wait for the relay's OK. */
async function rawPublish(url: string, ev: NostrEvent): Promise<boolean> {
  const ws = new WebSocket(url);
  await new Promise((res, rej) => ws.once('open', res).once('error', rej));
  const ok = await new Promise<boolean>((resolve) => {
    ws.on('message', (d) => {
      const m = JSON.parse(String(d)) as unknown[];
      if (m[0] === 'OK' && m[1] === ev.id) resolve(m[2] === true);
    });
    ws.send(JSON.stringify(['EVENT', ev]));
  });
  ws.close();
  return ok;
}

const relays: LocalRelay[] = [];
const pools: RelayPool[] = [];
const closers: (() => Promise<void> | void)[] = [];

async function relay(): Promise<LocalRelay> {
  const r = await startRelay();
  relays.push(r);
  return r;
}

function pool(urls: string[], extra: Partial<ConstructorParameters<typeof RelayPool>[0]> = {}): RelayPool {
  const p = new RelayPool({ urls, logger: silentLogger, minBackoffMs: 100, maxBackoffMs: 1000, ...extra });
  pools.push(p);
  return p;
}

afterEach(async () => {
  await Promise.all(pools.splice(0).map((p) => p.close()));
  await Promise.all(closers.splice(0).map((c) => c()));
  await Promise.all(relays.splice(0).map((r) => r.stop()));
});

describe('RelayPool', () => {
  it('delivers an event stored on two relays once, and a live one once', async () => {
    const [r1, r2] = [await relay(), await relay()];
    const urls = [r1.url, r2.url];
    const me = getPublicKey(generateSecretKey());
    const stored = note({ p: me });
    expect(await rawPublish(r1.url, stored)).toBe(true);
    expect(await rawPublish(r2.url, stored)).toBe(true);

    const sub = pool(urls);
    sub.start();
    const got: { id: string; url: string }[] = [];
    const eosed = new Set<string>();
    sub.subscribe([{ kinds: [1059], '#p': [me], since: now() - 2 * 86400 }], (ev, url) => got.push({ id: ev.id, url }), {
      onEose: (url) => eosed.add(url),
    });
    await waitFor(() => eosed.size === 2, 'EOSE from both relays');
    expect(got.map((g) => g.id)).toEqual([stored.id]);

    const pub = pool(urls);
    pub.start();
    await pub.waitConnected(5000);
    const live = note({ p: me });
    const res = await pub.publish(live);
    expect(res.accepted.length).toBeGreaterThanOrEqual(1);
    await waitFor(() => r1.eventCount() === 2 && r2.eventCount() === 2, 'both relays to store the live event');
    await barrier(sub, urls);
    expect(got.map((g) => g.id)).toEqual([stored.id, live.id]);
  });

  it('connects to a relay that was down at start and receives from it', async () => {
    const r = await relay();
    await r.stop();
    const p = pool([r.url]);
    p.start();
    const got: string[] = [];
    const me = getPublicKey(generateSecretKey());
    p.subscribe([{ kinds: [1059], '#p': [me], since: now() - 2 * 86400 }], (ev) => got.push(ev.id));
    await expect(p.waitConnected(300)).rejects.toThrow(/no relay connected/);
    expect(p.connectedCount()).toBe(0);

    await r.start();
    await p.waitConnected(10_000);
    const ev = note({ p: me });
    expect(await rawPublish(r.url, ev)).toBe(true);
    await waitFor(() => got.length === 1, 'the event');
    expect(got).toEqual([ev.id]);
  });

  it('after a relay restart, replays the same since and gets back-dated events published meanwhile', async () => {
    const r = await relay();
    const me = getPublicKey(generateSecretKey());
    const since = now() - 2 * 86400;
    const p = pool([r.url]);
    p.start();
    const got = new Set<string>();
    p.subscribe([{ kinds: [1059], '#p': [me], since }], (ev) => got.add(ev.id));
    await p.waitConnected(5000);
    const before = note({ p: me, createdAt: now() - 3600 });
    expect(await rawPublish(r.url, before)).toBe(true);
    await waitFor(() => got.has(before.id), 'the first event');

    await r.stop();
    await waitFor(() => p.connectedCount() === 0, 'the pool to notice the relay is gone');
    await r.start();
    // Gift-wrap style timestamps: a day in the past, older than anything seen so far.
    const later = Array.from({ length: 5 }, () => note({ p: me, createdAt: now() - 86400 }));
    for (const ev of later) expect(await rawPublish(r.url, ev)).toBe(true);
    await waitFor(() => later.every((ev) => got.has(ev.id)), 'all back-dated events');
    // Nothing delivered twice, nothing extra.
    await barrier(p, [r.url]);
    expect(got.size).toBe(6);
  });

  it('counts deliveries per id across the reconnect (no duplicates from the replayed REQ)', async () => {
    const r = await relay();
    const me = getPublicKey(generateSecretKey());
    const p = pool([r.url]);
    p.start();
    const got: string[] = [];
    p.subscribe([{ kinds: [1059], '#p': [me], since: now() - 2 * 86400 }], (ev) => got.push(ev.id));
    await p.waitConnected(5000);
    const ev = note({ p: me, createdAt: now() - 7200 });
    expect(await rawPublish(r.url, ev)).toBe(true);
    await waitFor(() => got.length === 1, 'the event');
    await r.stop();
    await waitFor(() => p.connectedCount() === 0, 'disconnect');
    await r.start();
    await p.waitConnected(10_000);
    await barrier(p, [r.url]); // the replayed REQ has returned the stored event again by now
    expect(got).toEqual([ev.id]);
  });

  it('publish resolves on the first OK while a second relay is down, and the queued copy reaches it later', async () => {
    const up = await relay();
    const down = await relay();
    await down.stop();
    const p = pool([up.url, down.url], { publishTimeoutMs: 10_000 });
    p.start();
    await p.waitConnected(5000);
    const ev = note();
    const res = await p.publish(ev);
    expect(res.accepted).toEqual([up.url]);
    expect(up.eventCount()).toBe(1);
    expect(down.eventCount()).toBe(0);

    await down.start();
    await waitFor(() => down.eventCount() === 1, 'the queued event to reach the restarted relay');
  });

  it('publish rejects with a PublishError when no relay is up', async () => {
    const r = await relay();
    await r.stop();
    const p = pool([r.url, 'ws://127.0.0.1:1'], { publishTimeoutMs: 300 });
    p.start();
    const err = await p.publish(note()).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(PublishError);
    const result = (err as PublishError).result;
    expect(result.accepted).toEqual([]);
    expect(result.rejected.map((x) => x.url).sort()).toEqual([r.url, 'ws://127.0.0.1:1'].sort());
    expect(result.rejected.every((x) => x.reason === 'not connected')).toBe(true);
  });

  it('publish rejects at once when every relay says no', async () => {
    const r = await relay();
    const p = pool([r.url], { publishTimeoutMs: 60_000 });
    p.start();
    await p.waitConnected(5000);
    const bad = { ...note(), sig: 'ab'.repeat(64) };
    const err = (await p.publish(bad).catch((e: unknown) => e)) as PublishError;
    expect(err).toBeInstanceOf(PublishError);
    expect(err.result.rejected).toEqual([{ url: r.url, reason: expect.stringMatching(/signature/) }]);
  });

  it('closing a subscription stops deliveries', async () => {
    const r = await relay();
    const p = pool([r.url]);
    p.start();
    await p.waitConnected(5000);
    const me = getPublicKey(generateSecretKey());
    const got: string[] = [];
    const sub = p.subscribe([{ kinds: [1059], '#p': [me] }], (ev) => got.push(ev.id));
    await barrier(p, [r.url]);
    sub.close();
    expect(await rawPublish(r.url, note({ p: me }))).toBe(true);
    await barrier(p, [r.url]);
    expect(got).toEqual([]);
  });
});

describe('RelayPool against a hostile relay', () => {
  it('ignores malformed frames, forged copies and unrelated events, and still delivers the real one', async () => {
    const me = getPublicKey(generateSecretKey());
    const good = note({ p: me });
    const other = note({ p: getPublicKey(generateSecretKey()) });
    const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    closers.push(() => new Promise<void>((res) => {
      for (const c of wss.clients) c.terminate();
      wss.close(() => res());
    }));
    await new Promise((res) => wss.once('listening', res));
    const url = `ws://127.0.0.1:${(wss.address() as AddressInfo).port}`;
    wss.on('connection', (ws) => {
      ws.on('message', (d) => {
        const m = JSON.parse(String(d)) as unknown[];
        if (m[0] !== 'REQ') return;
        const subId = m[1];
        for (const frame of [
          'not json',
          '{"an":"object"}',
          '[]',
          '[42]',
          JSON.stringify(['EVENT']),
          JSON.stringify(['EVENT', subId, 'nope']),
          JSON.stringify(['EVENT', subId, { ...good, sig: '00'.repeat(64) }]), // forged copy, same id
          JSON.stringify(['EVENT', subId, other]), // valid but not matching #p
          JSON.stringify(['EVENT', 'unknown-sub', good]),
          JSON.stringify(['OK']),
          JSON.stringify(['OK', 5, 'x']),
          JSON.stringify(['NOTICE']),
          JSON.stringify(['CLOSED', subId, 'because']),
          JSON.stringify(['EOSE', 12]),
          JSON.stringify(['SOMETHING', 1, 2]),
          JSON.stringify(['EVENT', subId, good]),
          JSON.stringify(['EVENT', subId, good]),
          JSON.stringify(['EOSE', subId]),
        ]) ws.send(frame);
      });
    });
    const p = pool([url]);
    p.start();
    const got: NostrEvent[] = [];
    let eose = false;
    const filters: Filter[] = [{ kinds: [1059], '#p': [me] }];
    p.subscribe(filters, (ev) => got.push(ev), { onEose: () => (eose = true) });
    await waitFor(() => eose, 'EOSE from the hostile relay');
    expect(got.map((e) => e.sig)).toEqual([good.sig]);
    expect(p.connectedCount()).toBe(1);
  });
});

describe('local relay', () => {
  it('honours #p on live subscriptions (two subscribers, each gets only theirs)', async () => {
    const r = await relay();
    const [x, y] = [getPublicKey(generateSecretKey()), getPublicKey(generateSecretKey())];
    const clients: { ws: WebSocket; got: string[]; eose: Set<string> }[] = [];
    for (const p of [x, y]) {
      const ws = new WebSocket(r.url);
      const c = { ws, got: [] as string[], eose: new Set<string>() };
      ws.on('message', (d) => {
        const m = JSON.parse(String(d)) as [string, string, NostrEvent?];
        if (m[0] === 'EVENT' && m[1] === 'live') c.got.push(m[2]!.id);
        if (m[0] === 'EOSE') c.eose.add(m[1]);
      });
      await new Promise((res) => ws.once('open', res));
      ws.send(JSON.stringify(['REQ', 'live', { kinds: [1059], '#p': [p] }]));
      await waitFor(() => c.eose.has('live'), 'initial EOSE');
      clients.push(c);
    }
    const forX = note({ p: x });
    const forY = note({ p: y });
    expect(await rawPublish(r.url, forX)).toBe(true);
    expect(await rawPublish(r.url, forY)).toBe(true);
    for (const c of clients) {
      c.ws.send(JSON.stringify(['REQ', 'barrier', { ids: ['0'.repeat(64)] }]));
      await waitFor(() => c.eose.has('barrier'), 'barrier EOSE');
      c.ws.close();
    }
    expect(clients[0]!.got).toEqual([forX.id]);
    expect(clients[1]!.got).toEqual([forY.id]);
  });

  it('keeps stored events across stop/start and replaces replaceable kinds', async () => {
    const r = await relay();
    const port = r.port;
    const sk = generateSecretKey();
    const mk = (kind: number, createdAt: number, d?: string): NostrEvent =>
      finalizeEvent({ kind, created_at: createdAt, tags: d ? [['d', d]] : [], content: '' }, sk);
    expect(await rawPublish(r.url, mk(1, now()))).toBe(true);
    expect(await rawPublish(r.url, mk(38383, now() - 10, 'offer'))).toBe(true);
    expect(await rawPublish(r.url, mk(38383, now(), 'offer'))).toBe(true); // replaces
    expect(await rawPublish(r.url, mk(38383, now() - 100, 'offer'))).toBe(true); // older: ignored (OK as duplicate)
    expect(await rawPublish(r.url, mk(20384, now()))).toBe(true); // ephemeral: not stored
    expect(r.eventCount()).toBe(2);
    await r.stop();
    await expect(rawPublish(r.url, mk(1, now()))).rejects.toThrow();
    await r.start();
    expect(r.port).toBe(port);
    expect(r.eventCount()).toBe(2);
  });
});
