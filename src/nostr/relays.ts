/**
 * The relay pool: one `ws` connection per relay, with our own reconnect loop.
 *
 * Why not nostr-tools' SimplePool/Relay: its reconnect moves `since` to the
 * newest `created_at` seen, and gift wraps carry timestamps randomised up to two
 * days into the past, so most wraps sent while we were away are never asked for
 * again; it also never retries a relay that was down at start. Here every
 * (re)connect replays each subscription with exactly the filters the caller
 * gave, relays that are down are retried forever with capped, jittered backoff,
 * and publishes wait for the relay's OK. Using `ws` directly (rather than a
 * nostr-tools Relay per connection) keeps one state machine we fully own:
 * no second reconnect or subscription bookkeeping underneath ours.
 *
 * Nothing here logs event content: ids, kinds and relay URLs only.
 *
 * Longer than the house's ~350 lines: connection, reconnect, subscription
 * replay and publish acknowledgement share one per-relay state machine.
 */
import WebSocket from 'ws';
import { matchFilters, type Filter } from 'nostr-tools/filter';
import { parseSignedEvent } from './event-shape.js';
import { verifySignedEvent } from './fast-crypto.js';
import type { Logger } from '../util/logger.js';
import type { NostrEvent } from './types.js';

export type { Filter };

export interface RelayPoolOptions {
  urls: string[];
  logger: Logger;
  /** First reconnect delay; doubles per failed attempt. Default 500. */
  minBackoffMs?: number;
  /** Cap on the reconnect delay. Default 30000. */
  maxBackoffMs?: number;
  /** How long publish() waits for a first OK true. Default 5000. */
  publishTimeoutMs?: number;
  /** How long an event stays queued for a relay that has not acknowledged it. Default 120000. */
  queueTtlMs?: number;
  /** Ping period; a connection that missed the previous pong is dropped. Default 30000. */
  pingIntervalMs?: number;
  /** Check event signatures before dedupe and delivery. Default true. */
  verifySignatures?: boolean;
  /** Per-subscription dedupe memory. Defaults: 100000 ids, 3 days (longer than the 2-day gift-wrap window). */
  dedupeMaxEntries?: number;
  dedupeTtlMs?: number;
}

export interface PublishResult {
  accepted: string[];
  rejected: { url: string; reason: string }[];
}

export class PublishError extends Error {
  override name = 'PublishError';
  constructor(message: string, readonly result: PublishResult) {
    super(message);
  }
}

export interface SubscribeOptions {
  /** Called when a relay signals the end of stored events for this subscription (once per connect). */
  onEose?: (relayUrl: string) => void;
}

/**
 * Receives each new event once. Returning exactly false means "not taken" (e.g. a
 * full queue): the id is forgotten, so the next (re)connect's replay brings
 * the event again.
 */
export type EventHandler = (ev: NostrEvent, relayUrl: string) => unknown;

export interface Subscription {
  close(): void;
}

/** Ids seen recently; insertion order is expiry order, so pruning is from the front. */
class SeenIds {
  private readonly map = new Map<string, number>();
  constructor(private readonly max: number, private readonly ttlMs: number) {}

  has(id: string, now: number): boolean {
    const exp = this.map.get(id);
    return exp !== undefined && exp > now;
  }

  delete(id: string): void {
    this.map.delete(id);
  }

  add(id: string, now: number): void {
    this.map.delete(id);
    this.map.set(id, now + this.ttlMs);
    for (const [k, exp] of this.map) {
      if (this.map.size <= this.max && exp > now) break;
      this.map.delete(k);
    }
  }
}

interface Sub {
  id: string;
  /** Filters as last sent; recomputed from `makeFilters` on every REQ. */
  filters: Filter[];
  makeFilters: () => Filter[];
  onEvent: EventHandler;
  onEose?: (relayUrl: string) => void;
  seen: SeenIds;
}

interface Queued {
  ev: NostrEvent;
  deadline: number;
}

interface Conn {
  url: string;
  ws?: WebSocket;
  open: boolean;
  attempt: number;
  openedAt: number;
  retryTimer?: NodeJS.Timeout;
  pingTimer?: NodeJS.Timeout;
  alive: boolean;
  /** Events this relay has not acknowledged yet, sent (again) on every connect. */
  outbox: Map<string, Queued>;
}

interface Pending {
  waiting: Set<string>;
  result: PublishResult;
  timer: NodeJS.Timeout;
  resolve: (r: PublishResult) => void;
  reject: (e: Error) => void;
}

/** A connection that lived this long counts as healthy: the next failure starts backoff afresh. */
const STABLE_AFTER_MS = 10_000;
/**
 * Frames above this are dropped unread (never parsed) and the connection
 * stays: the largest event this pool accepts (event-shape's bounds) fits
 * well within it.
 */
export const MAX_PARSED_FRAME_BYTES = 1024 * 1024;
/**
 * Frames above this close the connection (`ws` refuses to buffer them; code
 * 1009) and the reconnect loop takes over, as after any disconnect: a bound
 * on the memory one frame can take.
 */
export const MAX_FRAME_BYTES = 16 * 1024 * 1024;

/** Why a frame or an event from a relay was not delivered; counted in `stats()`. */
export type RelayDropReason =
  | 'oversize_frame'
  | 'junk_frame'
  | 'unknown_verb'
  | 'unknown_subscription'
  | 'bad_shape'
  | 'filter_mismatch'
  | 'duplicate'
  | 'bad_signature';

export interface RelayPoolStats {
  /** Frames received from all relays. */
  frames: number;
  /** Events handed to subscribers. */
  delivered: number;
  dropped: Record<RelayDropReason, number>;
  /** Handler failures caught here (a bug elsewhere, never a reason to lose the socket). */
  handlerErrors: number;
}

function frameBytes(data: WebSocket.RawData): number {
  if (Array.isArray(data)) return data.reduce((n, b) => n + b.length, 0);
  return data.byteLength;
}

function frameText(data: WebSocket.RawData): string {
  if (Buffer.isBuffer(data)) return data.toString('utf8');
  if (Array.isArray(data)) return Buffer.concat(data).toString('utf8');
  return Buffer.from(data).toString('utf8');
}

export class RelayPool {
  private readonly log: Logger;
  private readonly minBackoff: number;
  private readonly maxBackoff: number;
  private readonly publishTimeout: number;
  private readonly queueTtl: number;
  private readonly pingInterval: number;
  private readonly verify: boolean;
  private readonly dedupeMax: number;
  private readonly dedupeTtl: number;

  private readonly conns: Conn[];
  private readonly subs = new Map<string, Sub>();
  private readonly pending = new Map<string, Set<Pending>>();
  private readonly waiters = new Set<() => void>();
  private subCounter = 0;
  private started = false;
  private readonly counts: RelayPoolStats = {
    frames: 0,
    delivered: 0,
    dropped: {
      oversize_frame: 0,
      junk_frame: 0,
      unknown_verb: 0,
      unknown_subscription: 0,
      bad_shape: 0,
      filter_mismatch: 0,
      duplicate: 0,
      bad_signature: 0,
    },
    handlerErrors: 0,
  };
  private closed = false;

  constructor(opts: RelayPoolOptions) {
    this.log = opts.logger;
    this.minBackoff = opts.minBackoffMs ?? 500;
    this.maxBackoff = Math.max(opts.maxBackoffMs ?? 30_000, this.minBackoff);
    this.publishTimeout = opts.publishTimeoutMs ?? 5_000;
    this.queueTtl = opts.queueTtlMs ?? 120_000;
    this.pingInterval = opts.pingIntervalMs ?? 30_000;
    this.verify = opts.verifySignatures ?? true;
    this.dedupeMax = opts.dedupeMaxEntries ?? 100_000;
    this.dedupeTtl = opts.dedupeTtlMs ?? 3 * 24 * 3600 * 1000;
    const urls = [...new Set(opts.urls)];
    this.conns = urls.map((url) => ({ url, open: false, attempt: 0, openedAt: 0, alive: false, outbox: new Map() }));
  }

  /** Connect to every relay. Relays that are down are retried until close(). */
  start(): void {
    if (this.started || this.closed) return;
    this.started = true;
    for (const c of this.conns) this.connect(c);
  }

  /**
   * Follow a new relay list (config reload): connect to added relays, close
   * removed ones. Subscriptions are sent to the added relays as they connect;
   * events queued only for a removed relay are dropped with it.
   */
  setRelays(urls: readonly string[]): { added: string[]; removed: string[] } {
    const want = [...new Set(urls)];
    const removed = this.conns.filter((c) => !want.includes(c.url));
    const added = want.filter((url) => !this.conns.some((c) => c.url === url));
    for (const c of removed) {
      this.conns.splice(this.conns.indexOf(c), 1);
      void this.shutdownConn(c);
    }
    for (const url of added) {
      const c: Conn = { url, open: false, attempt: 0, openedAt: 0, alive: false, outbox: new Map() };
      this.conns.push(c);
      if (this.started && !this.closed) this.connect(c);
    }
    return { added, removed: removed.map((c) => c.url) };
  }

  /** Counters since start (a copy). */
  stats(): RelayPoolStats {
    return { ...this.counts, dropped: { ...this.counts.dropped } };
  }

  connectedCount(): number {
    return this.conns.filter((c) => c.open).length;
  }

  /** Resolves once at least one relay is connected; rejects after timeoutMs. */
  waitConnected(timeoutMs: number): Promise<void> {
    if (this.connectedCount() > 0) return Promise.resolve();
    if (this.closed) return Promise.reject(new Error('relay pool is closed'));
    return new Promise((resolve, reject) => {
      const done = (): void => {
        clearTimeout(timer);
        this.waiters.delete(done);
        if (this.connectedCount() > 0) resolve();
        else reject(new Error('relay pool is closed'));
      };
      const timer = setTimeout(() => {
        this.waiters.delete(done);
        reject(new Error(`no relay connected within ${timeoutMs} ms (${this.conns.map((c) => c.url).join(', ')})`));
      }, timeoutMs);
      this.waiters.add(done);
    });
  }

  /**
   * Subscribe with filters replayed on every (re)connect, so a `since` keeps
   * covering events sent while a relay was away. Pass a function to have the
   * filters recomputed at each (re)connect (e.g. a `since` window relative to
   * now for a service that runs for weeks). Each event id reaches onEvent once
   * per subscription, across relays and reconnects.
   */
  subscribe(
    filters: Filter[] | (() => Filter[]),
    onEvent: EventHandler,
    opts: SubscribeOptions = {},
  ): Subscription {
    const id = `pg-${++this.subCounter}-${Math.random().toString(36).slice(2, 8)}`;
    const makeFilters = typeof filters === 'function' ? filters : () => structuredClone(filters);
    const sub: Sub = {
      id,
      filters: makeFilters(),
      makeFilters,
      onEvent,
      seen: new SeenIds(this.dedupeMax, this.dedupeTtl),
      ...(opts.onEose ? { onEose: opts.onEose } : {}),
    };
    this.subs.set(id, sub);
    for (const c of this.conns) if (c.open) this.sendReq(c, sub);
    return {
      close: () => {
        if (!this.subs.delete(id)) return;
        for (const c of this.conns) if (c.open) this.send(c, ['CLOSE', id]);
      },
    };
  }

  /**
   * Send to every relay. Resolves at the first OK true; rejects with a
   * PublishError when every relay said no or nobody accepted within
   * publishTimeoutMs. Relays that are down keep the event queued (queueTtlMs)
   * and get it when they connect, whatever the promise did.
   */
  publish(ev: NostrEvent): Promise<PublishResult> {
    if (this.closed) return Promise.reject(new PublishError('relay pool is closed', { accepted: [], rejected: [] }));
    const now = Date.now();
    return new Promise<PublishResult>((resolve, reject) => {
      const p: Pending = {
        waiting: new Set(this.conns.map((c) => c.url)),
        result: { accepted: [], rejected: [] },
        resolve,
        reject,
        timer: setTimeout(() => {
          for (const url of p.waiting) {
            const c = this.conns.find((x) => x.url === url);
            p.result.rejected.push({ url, reason: c?.open ? 'timeout: no OK from relay' : 'not connected' });
          }
          p.waiting.clear();
          this.settle(ev.id, p);
        }, this.publishTimeout),
      };
      let set = this.pending.get(ev.id);
      if (!set) this.pending.set(ev.id, (set = new Set()));
      set.add(p);
      for (const c of this.conns) {
        this.pruneOutbox(c, now);
        c.outbox.set(ev.id, { ev, deadline: now + this.queueTtl });
        if (c.open) this.send(c, ['EVENT', ev]);
      }
      if (this.conns.length === 0) {
        p.waiting.clear();
        this.settle(ev.id, p);
      }
    });
  }

  /** Close every connection and stop reconnecting. Pending publishes are rejected. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const set of this.pending.values()) {
      for (const p of set) {
        clearTimeout(p.timer);
        p.reject(new PublishError('relay pool closed before any relay accepted', p.result));
      }
    }
    this.pending.clear();
    for (const w of [...this.waiters]) w();
    this.subs.clear();
    await Promise.all(this.conns.map((c) => this.shutdownConn(c)));
  }

  // --- connection state machine -------------------------------------------

  private connect(c: Conn): void {
    if (this.closed) return;
    c.retryTimer = undefined;
    let ws: WebSocket;
    try {
      ws = new WebSocket(c.url, { handshakeTimeout: 10_000, maxPayload: MAX_FRAME_BYTES });
    } catch (err) {
      // A malformed URL throws synchronously; it will not get better, but keep the retry loop uniform.
      this.log.warn({ url: c.url, err: (err as Error).message }, 'relay url rejected');
      this.scheduleReconnect(c, false);
      return;
    }
    c.ws = ws;
    ws.on('open', () => {
      if (c.ws !== ws) return;
      c.open = true;
      c.alive = true;
      c.openedAt = Date.now();
      this.log.info({ url: c.url, attempt: c.attempt }, 'relay connected');
      for (const sub of this.subs.values()) this.sendReq(c, sub);
      this.flushOutbox(c);
      c.pingTimer = setInterval(() => this.ping(c, ws), this.pingInterval);
      c.pingTimer.unref();
      for (const w of [...this.waiters]) w();
    });
    ws.on('message', (data) => {
      if (c.ws !== ws) return;
      this.onFrame(c, data);
    });
    ws.on('pong', () => {
      if (c.ws === ws) c.alive = true;
    });
    ws.on('error', (err) => {
      // Always followed by 'close'; the reconnect happens there.
      if (c.ws === ws) this.log.debug({ url: c.url, err: err.message }, 'relay socket error');
    });
    ws.on('close', (code) => {
      if (c.ws !== ws) return;
      const wasOpen = c.open;
      c.ws = undefined;
      c.open = false;
      clearInterval(c.pingTimer);
      if (this.closed) return;
      if (wasOpen) this.log.warn({ url: c.url, code }, 'relay disconnected');
      this.scheduleReconnect(c, wasOpen && Date.now() - c.openedAt >= STABLE_AFTER_MS);
    });
  }

  private scheduleReconnect(c: Conn, wasStable: boolean): void {
    if (this.closed) return;
    if (wasStable) c.attempt = 0;
    const base = Math.min(this.maxBackoff, this.minBackoff * 2 ** Math.min(c.attempt, 30));
    // Jitter in [base/2, base]: relays restarted together are not hammered in lockstep.
    const delay = Math.round(base / 2 + (Math.random() * base) / 2);
    c.attempt += 1;
    const level = c.attempt === 1 || delay >= this.maxBackoff / 2 ? 'info' : 'debug';
    this.log[level]({ url: c.url, attempt: c.attempt, retryInMs: delay }, 'relay reconnect scheduled');
    c.retryTimer = setTimeout(() => this.connect(c), delay);
  }

  private ping(c: Conn, ws: WebSocket): void {
    if (c.ws !== ws) return;
    if (!c.alive) {
      // No pong since the last ping: a half-open TCP connection that would never deliver again.
      this.log.warn({ url: c.url }, 'relay missed a pong; dropping the connection');
      ws.terminate();
      return;
    }
    c.alive = false;
    try {
      ws.ping();
    } catch {
      ws.terminate();
    }
  }

  private async shutdownConn(c: Conn): Promise<void> {
    clearTimeout(c.retryTimer);
    clearInterval(c.pingTimer);
    const ws = c.ws;
    c.ws = undefined;
    c.open = false;
    if (!ws || ws.readyState === WebSocket.CLOSED) return;
    if (ws.readyState !== WebSocket.OPEN) {
      ws.terminate();
      return;
    }
    await new Promise<void>((resolve) => {
      const t = setTimeout(() => {
        ws.terminate();
        resolve();
      }, 1_000);
      ws.once('close', () => {
        clearTimeout(t);
        resolve();
      });
      ws.close(1000);
    });
  }

  // --- outgoing -------------------------------------------------------------

  private send(c: Conn, msg: unknown[]): void {
    const ws = c.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    ws.send(JSON.stringify(msg), (err) => {
      if (err) this.log.debug({ url: c.url, err: err.message }, 'relay send failed');
    });
  }

  private sendReq(c: Conn, sub: Sub): void {
    sub.filters = sub.makeFilters();
    this.send(c, ['REQ', sub.id, ...sub.filters]);
  }

  private pruneOutbox(c: Conn, now: number): void {
    for (const [id, q] of c.outbox) {
      if (q.deadline <= now) {
        c.outbox.delete(id);
        this.log.debug({ url: c.url, eventId: id }, 'queued event expired unsent');
      }
    }
  }

  private flushOutbox(c: Conn): void {
    this.pruneOutbox(c, Date.now());
    for (const q of c.outbox.values()) this.send(c, ['EVENT', q.ev]);
  }

  private settle(eventId: string, p: Pending): void {
    const set = this.pending.get(eventId);
    if (!set?.delete(p)) return;
    if (set.size === 0) this.pending.delete(eventId);
    clearTimeout(p.timer);
    const result: PublishResult = { accepted: [...p.result.accepted], rejected: [...p.result.rejected] };
    if (result.accepted.length > 0) {
      p.resolve(result);
    } else {
      const why = result.rejected.map((r) => `${r.url}: ${r.reason}`).join('; ') || 'no relays configured';
      p.reject(new PublishError(`no relay accepted event ${eventId} (${why})`, result));
    }
  }

  // --- incoming -------------------------------------------------------------

  private onFrame(c: Conn, data: WebSocket.RawData): void {
    this.counts.frames++;
    if (frameBytes(data) > MAX_PARSED_FRAME_BYTES) {
      this.drop(c, 'oversize_frame');
      return;
    }
    let msg: unknown;
    try {
      msg = JSON.parse(frameText(data));
    } catch {
      this.drop(c, 'junk_frame');
      return;
    }
    if (!Array.isArray(msg) || typeof msg[0] !== 'string') {
      this.drop(c, 'junk_frame');
      return;
    }
    try {
      switch (msg[0]) {
        case 'EVENT':
          this.onEventFrame(c, msg[1], msg[2]);
          break;
        case 'OK':
          if (typeof msg[1] === 'string' && typeof msg[2] === 'boolean') {
            this.onOk(c, msg[1], msg[2], typeof msg[3] === 'string' ? msg[3] : '');
          }
          break;
        case 'EOSE': {
          const sub = typeof msg[1] === 'string' ? this.subs.get(msg[1]) : undefined;
          sub?.onEose?.(c.url);
          break;
        }
        case 'CLOSED':
          // The relay ended our subscription (auth, limits…); it is replayed on the next reconnect.
          this.log.warn({ url: c.url, subId: String(msg[1]).slice(0, 64), reason: String(msg[2] ?? '').slice(0, 200) }, 'relay closed a subscription');
          break;
        case 'NOTICE':
          this.log.debug({ url: c.url, notice: String(msg[1] ?? '').slice(0, 200) }, 'relay notice');
          break;
        case 'AUTH':
          this.log.debug({ url: c.url }, 'relay asked for NIP-42 auth; not supported');
          break;
        default:
          this.drop(c, 'unknown_verb');
      }
    } catch (err) {
      // A throwing subscriber or EOSE callback must not take the socket handler down.
      this.counts.handlerErrors++;
      this.log.error({ url: c.url, err: (err as Error).message }, 'error while handling relay message');
    }
  }

  private drop(c: Conn, reason: RelayDropReason): void {
    this.counts.dropped[reason]++;
    this.log.trace({ url: c.url, reason }, 'relay frame dropped');
  }

  private onEventFrame(c: Conn, subId: unknown, raw: unknown): void {
    const sub = typeof subId === 'string' ? this.subs.get(subId) : undefined;
    if (!sub) return this.drop(c, 'unknown_subscription');
    // From here on only the signed fields exist: whatever else the relay put
    // in the object (an unsigned field deep enough to overflow a structured
    // clone, say) is gone before any queue, worker or subscriber sees it.
    const ev = parseSignedEvent(raw);
    if (!ev) return this.drop(c, 'bad_shape');
    // Relays are not trusted to filter (some ignore tag filters on live events).
    if (!matchFilters(sub.filters, ev)) return this.drop(c, 'filter_mismatch');
    const now = Date.now();
    if (sub.seen.has(ev.id, now)) return this.drop(c, 'duplicate');
    // Verify before remembering the id: a forged copy must not shadow the real event.
    // libsecp256k1 (WASM) where possible; openDm then skips its own check of this object.
    if (this.verify && !verifySignedEvent(ev)) {
      this.log.debug({ url: c.url, eventId: ev.id, kind: ev.kind }, 'dropping event with a bad signature');
      return this.drop(c, 'bad_signature');
    }
    sub.seen.add(ev.id, now);
    this.counts.delivered++;
    if (sub.onEvent(ev, c.url) === false) sub.seen.delete(ev.id);
  }

  private onOk(c: Conn, eventId: string, ok: boolean, reason: string): void {
    // Answered either way: do not resend to this relay.
    c.outbox.delete(eventId);
    const set = this.pending.get(eventId);
    if (!ok) this.log.debug({ url: c.url, eventId, reason: reason.slice(0, 200) }, 'relay rejected event');
    if (!set) return;
    for (const p of [...set]) {
      if (!p.waiting.delete(c.url)) continue;
      if (ok) p.result.accepted.push(c.url);
      else p.result.rejected.push({ url: c.url, reason: reason.slice(0, 200) });
      if (ok || p.waiting.size === 0) this.settle(eventId, p);
    }
  }
}
