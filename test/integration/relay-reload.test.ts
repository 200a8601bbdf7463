/**
 * RelayPool.setRelays, what a config reload does to the relay list: an added
 * relay is connected and gets the live subscriptions, a removed one is closed
 * and delivers nothing more. Real relays on 127.0.0.1.
 */
import { afterAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { finalizeEvent, generateSecretKey } from 'nostr-tools/pure';
import { silentLogger } from '../../src/util/logger.js';
import { RelayPool } from '../../src/nostr/relays.js';
import type { NostrEvent } from '../../src/nostr/types.js';
import { startRelay, type LocalRelay } from '../support/relay.js';
import { until } from '../support/net.js';

const author = generateSecretKey();
const note = (content: string): NostrEvent =>
  finalizeEvent({ kind: 1, created_at: Math.floor(Date.now() / 1000), tags: [], content }, author);

/** Publish with a bare client and wait for the relay's OK. */
async function rawPublish(url: string, ev: NostrEvent): Promise<void> {
  const ws = new WebSocket(url);
  await new Promise((res, rej) => ws.once('open', res).once('error', rej));
  await new Promise<void>((resolve) => {
    ws.on('message', (d) => {
      const m = JSON.parse(String(d)) as unknown[];
      if (m[0] === 'OK' && m[1] === ev.id) resolve();
    });
    ws.send(JSON.stringify(['EVENT', ev]));
  });
  ws.close();
}

describe('RelayPool.setRelays (config reload)', () => {
  const relays: LocalRelay[] = [];
  let pool: RelayPool | undefined;
  afterAll(async () => {
    await pool?.close();
    for (const r of relays) await r.stop();
  });

  it('connects added relays with the live subscriptions and drops removed ones', async () => {
    const a = await startRelay({ port: 47020 });
    const b = await startRelay({ port: 47021 });
    relays.push(a, b);
    pool = new RelayPool({ urls: [a.url], logger: silentLogger, minBackoffMs: 50 });
    pool.start();
    const got: string[] = [];
    pool.subscribe(() => [{ kinds: [1], since: Math.floor(Date.now() / 1000) - 60 }], (ev) => got.push(ev.content));
    await pool.waitConnected(10_000);
    await rawPublish(a.url, note('via a, before'));
    await until(() => got.includes('via a, before'), 10_000, 'the event from relay a');

    expect(pool.setRelays([b.url])).toEqual({ added: [b.url], removed: [a.url] });
    await until(() => pool!.connectedCount() === 1, 10_000, 'relay b connected');
    await rawPublish(a.url, note('via a, after'));
    await rawPublish(b.url, note('via b'));
    await until(() => got.includes('via b'), 10_000, 'the event from relay b');
    // b's subscription replays the last minute, and a is no longer listened to.
    expect(got.filter((c) => c === 'via a, after')).toEqual([]);
  });
});
