/**
 * A real Nostr relay on 127.0.0.1 for tests and the demo: @nostr-relay/core
 * (0.0.40) behind a `ws` server, with an in-memory event repository.
 *
 * Two things differ from the stock library, both on purpose:
 * - live subscriptions honour `#x` tag filters (0.0.40's EventUtils.isMatchingFilter
 *   ignores them, so every kind-1059 subscriber would get every gift wrap);
 * - the result cache is off (`filterResultCacheTtl: 0`) so a REQ right after a
 *   publish sees the event.
 *
 * `stop()` drops every client socket (clients see a disconnect) and frees the
 * port; `start()` listens again on the same port with the same stored events,
 * which is what fault-injection tests need ("kill the relay, restart it").
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { WebSocketServer, type WebSocket } from 'ws';
import { NostrRelay } from '@nostr-relay/core';
import {
  EventRepository,
  EventType,
  EventUtils,
  LogLevel,
  type Event,
  type EventRepositoryUpsertResult,
  type Filter,
  type Logger as RelayLogger,
} from '@nostr-relay/common';
import { Validator } from '@nostr-relay/validator';

export interface LocalRelay {
  url: string;
  port: number;
  /** Close every client socket and the listening socket; stored events are kept. */
  stop(): Promise<void>;
  /** Listen again on the same port, keeping stored events. No-op when running. */
  start(): Promise<void>;
  /** Number of stored (non-ephemeral) events. */
  eventCount(): number;
  /**
   * Write policy, as real relays have: events signed by these pubkeys are
   * answered `OK false` and not stored. For tests of publishers that must not
   * lose a message no relay accepted.
   */
  blockAuthors: Set<string>;
}

/**
 * NIP-01 filter match including tag filters. Used both for stored queries and,
 * patched into EventUtils, for live subscriptions.
 */
export function eventMatchesFilter(event: Event, filter: Filter): boolean {
  if (filter.ids && !filter.ids.includes(event.id)) return false;
  if (filter.authors && !filter.authors.includes(event.pubkey)) return false;
  if (filter.kinds && !filter.kinds.includes(event.kind)) return false;
  if (filter.since !== undefined && event.created_at < filter.since) return false;
  if (filter.until !== undefined && event.created_at > filter.until) return false;
  for (const [key, values] of Object.entries(filter)) {
    if (key[0] !== '#' || key.length !== 2 || !Array.isArray(values)) continue;
    const name = key[1];
    const wanted = values as string[];
    if (!event.tags.some((t) => t[0] === name && t[1] !== undefined && wanted.includes(t[1]))) return false;
  }
  return true;
}

let patched = false;
/** Fix 0.0.40's live-subscription matcher, which skips tag filters. Process-wide, idempotent. */
function patchLiveMatching(): void {
  if (patched) return;
  patched = true;
  (EventUtils as unknown as { isMatchingFilter: typeof eventMatchesFilter }).isMatchingFilter = eventMatchesFilter;
}

/** Keeps events in memory; handles replaceable and parameterised-replaceable kinds. */
export class MemoryEventRepository extends EventRepository {
  private readonly byId = new Map<string, Event>();
  /** Replaceable address (pubkey:kind[:d]) → id of the current event. */
  private readonly byAddress = new Map<string, string>();

  isSearchSupported(): boolean {
    return false;
  }

  upsert(event: Event): EventRepositoryUpsertResult {
    if (this.byId.has(event.id)) return { isDuplicate: true };
    const type = EventUtils.getType(event.kind);
    // Ephemeral events never reach upsert (the core broadcasts them directly), but be safe.
    if (type === EventType.EPHEMERAL) return { isDuplicate: false };
    if (type === EventType.REPLACEABLE || type === EventType.PARAMETERIZED_REPLACEABLE) {
      const address = `${event.pubkey}:${event.kind}:${EventUtils.extractDTagValue(event) ?? ''}`;
      const currentId = this.byAddress.get(address);
      const current = currentId === undefined ? undefined : this.byId.get(currentId);
      if (current) {
        // NIP-01: newest wins; on a tie the lowest id wins.
        const newer = event.created_at > current.created_at ||
          (event.created_at === current.created_at && event.id < current.id);
        if (!newer) return { isDuplicate: true };
        this.byId.delete(current.id);
      }
      this.byAddress.set(address, event.id);
    }
    this.byId.set(event.id, event);
    return { isDuplicate: false };
  }

  find(filter: Filter): Event[] {
    const out: Event[] = [];
    for (const ev of this.byId.values()) if (eventMatchesFilter(ev, filter)) out.push(ev);
    // Newest first, as relays answer; the limit applies to that order.
    out.sort((a, b) => b.created_at - a.created_at || (a.id < b.id ? -1 : 1));
    return filter.limit !== undefined ? out.slice(0, Math.max(0, filter.limit)) : out;
  }

  async destroy(): Promise<void> {
    this.byId.clear();
    this.byAddress.clear();
  }

  get size(): number {
    return this.byId.size;
  }
}

const quietLogger: RelayLogger = {
  setLogLevel() {},
  debug() {},
  info() {},
  warn() {},
  error() {},
};

export async function startRelay(opts: { port?: number; host?: string } = {}): Promise<LocalRelay> {
  patchLiveMatching();
  const host = opts.host ?? '127.0.0.1';
  const repo = new MemoryEventRepository();
  const relay = new NostrRelay(repo, {
    filterResultCacheTtl: 0,
    logger: quietLogger,
    logLevel: LogLevel.ERROR,
  });
  const validator = new Validator();

  let server: Server | undefined;
  let wss: WebSocketServer | undefined;
  let port = opts.port ?? 0;

  const blockAuthors = new Set<string>();
  const onConnection = (ws: WebSocket): void => {
    relay.handleConnection(ws);
    ws.on('message', async (data) => {
      try {
        const message = await validator.validateIncomingMessage(data as Buffer);
        if (message[0] === 'EVENT' && blockAuthors.has(message[1].pubkey)) {
          ws.send(JSON.stringify(['OK', message[1].id, false, 'blocked: this author may not write here']));
          return;
        }
        await relay.handleMessage(ws, message);
      } catch (err) {
        if (ws.readyState === ws.OPEN) {
          ws.send(JSON.stringify(['NOTICE', `invalid: ${(err as Error).message}`]));
        }
      }
    });
    ws.on('close', () => relay.handleDisconnect(ws));
    ws.on('error', () => relay.handleDisconnect(ws));
  };

  const start = async (): Promise<void> => {
    if (server) return;
    const srv = createServer((_req, res) => {
      res.writeHead(426, { 'content-type': 'text/plain' }).end('nostr relay: use a websocket\n');
    });
    const sock = new WebSocketServer({ server: srv });
    sock.on('connection', onConnection);
    await new Promise<void>((resolve, reject) => {
      srv.once('error', reject);
      srv.listen(port, host, () => {
        srv.off('error', reject);
        resolve();
      });
    });
    port = (srv.address() as AddressInfo).port;
    server = srv;
    wss = sock;
  };

  const stop = async (): Promise<void> => {
    const srv = server;
    const sock = wss;
    server = undefined;
    wss = undefined;
    if (!srv || !sock) return;
    // terminate(), not close(): a killed relay does not say goodbye, and the port must be free now.
    for (const client of sock.clients) {
      relay.handleDisconnect(client);
      client.terminate();
    }
    await new Promise<void>((resolve) => sock.close(() => resolve()));
    srv.closeAllConnections();
    await new Promise<void>((resolve) => srv.close(() => resolve()));
  };

  await start();
  return {
    get url() {
      return `ws://${host}:${port}`;
    },
    get port() {
      return port;
    },
    start,
    stop,
    eventCount: () => repo.size,
    blockAuthors,
  };
}
