/**
 * A relay the test scripts frame by frame: a raw `ws` server on 127.0.0.1 that
 * speaks just enough of NIP-01 to be subscribed to and published on, and
 * otherwise sends whatever text the test gives it (junk, multi-MB frames,
 * deep arrays written as raw JSON, verbs nobody knows, events for other
 * subscriptions). Events the agent publishes are kept and answered `OK true`,
 * except those `holdOk` picks, which get no answer at all.
 *
 * Like a real relay it keeps "stored" frames and sends them again after each
 * REQ, so a test can cut a connection and watch the agent resubscribe.
 */
import { WebSocketServer, type WebSocket } from 'ws';
import type { NostrEvent } from '../../src/nostr/types.js';

export interface HostileRelay {
  url: string;
  /** Connections accepted so far. */
  connections(): number;
  /** Resolves with the subscription id of the REQ number `n` (1-based, across connections). */
  req(n: number, timeoutMs?: number): Promise<string>;
  /** The subscription id of the latest REQ. */
  subId(): string;
  /** A frame to the current connection, as given (text or bytes). */
  send(frame: string | Buffer): void;
  /** Frames (built from the sub id of each REQ) sent after every REQ, before anything `send` adds. */
  store(frame: (subId: string) => string): void;
  /** Events the agent published, in arrival order. */
  published: NostrEvent[];
  /** Publishes it returns true for get no OK (the publisher waits until its own timeout). */
  holdOk: (ev: NostrEvent) => boolean;
  /** Resolves once `published` has at least `n` events. */
  waitPublished(n: number, timeoutMs?: number): Promise<void>;
  close(): Promise<void>;
}

export async function startHostileRelay(port: number): Promise<HostileRelay> {
  const wss = new WebSocketServer({ host: '127.0.0.1', port, maxPayload: 64 * 1024 * 1024 });
  await new Promise<void>((resolve, reject) => {
    wss.once('listening', resolve);
    wss.once('error', reject);
  });
  let current: WebSocket | undefined;
  let accepted = 0;
  const reqs: string[] = [];
  const stored: Array<(subId: string) => string> = [];
  const published: NostrEvent[] = [];
  const waiters = new Set<() => void>();
  const wake = (): void => {
    for (const w of [...waiters]) w();
  };

  wss.on('connection', (ws) => {
    accepted++;
    current = ws;
    ws.on('error', () => undefined);
    ws.on('message', (data) => {
      let msg: unknown;
      try {
        msg = JSON.parse(data.toString());
      } catch {
        return;
      }
      if (!Array.isArray(msg)) return;
      if (msg[0] === 'REQ' && typeof msg[1] === 'string') {
        reqs.push(msg[1]);
        for (const frame of stored) ws.send(frame(msg[1]));
        ws.send(JSON.stringify(['EOSE', msg[1]]));
        wake();
      } else if (msg[0] === 'EVENT' && msg[1] && typeof msg[1] === 'object') {
        const ev = msg[1] as NostrEvent;
        published.push(ev);
        if (!relay.holdOk(ev)) ws.send(JSON.stringify(['OK', ev.id, true, '']));
        wake();
      }
    });
  });

  const until = (cond: () => boolean, what: string, timeoutMs: number): Promise<void> =>
    new Promise((resolve, reject) => {
      const check = (): void => {
        if (!cond()) return;
        waiters.delete(check);
        clearTimeout(timer);
        resolve();
      };
      const timer = setTimeout(() => {
        waiters.delete(check);
        reject(new Error(`hostile relay: ${what} not within ${timeoutMs} ms`));
      }, timeoutMs);
      waiters.add(check);
      check();
    });

  const relay: HostileRelay = {
    url: `ws://127.0.0.1:${port}`,
    connections: () => accepted,
    async req(n, timeoutMs = 60_000) {
      await until(() => reqs.length >= n, `REQ number ${n}`, timeoutMs);
      return reqs[n - 1]!;
    },
    subId: () => reqs[reqs.length - 1] ?? '',
    send(frame) {
      current?.send(frame);
    },
    store(frame) {
      stored.push(frame);
    },
    published,
    holdOk: () => false,
    waitPublished: (n, timeoutMs = 120_000) => until(() => published.length >= n, `${n} published events`, timeoutMs),
    async close() {
      for (const c of wss.clients) c.terminate();
      await new Promise<void>((resolve) => wss.close(() => resolve()));
    },
  };
  return relay;
}
