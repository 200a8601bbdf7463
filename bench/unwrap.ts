/**
 * B3, unwrap throughput: the agent's receive path (relay-pool signature check
 * + openDm) against nostr-tools' nip17.unwrapEvent on the same wraps, one
 * thread and as a flood through the UnwrapPool, and against
 * @rust-nostr/nostr-sdk (a dev dependency) when it is installed.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { generateSecretKey, getPublicKey, verifyEvent } from 'nostr-tools/pure';
import * as nip17 from 'nostr-tools/nip17';
import { openDm, sealDmRequest } from '../src/nostr/dm.js';
import { ecdhBackend, signatureBackend, verifySignedEvent } from '../src/nostr/fast-crypto.js';
import type { NostrEvent } from '../src/nostr/types.js';
import { UnwrapPool } from '../src/nostr/unwrap-pool.js';
import type { PoolResults, UnwrapResults } from './results.js';
import { r1, r2 } from './stats.js';

/** The agent's receive path for one wrap as it comes off the wire: pool signature check, then openDm. */
function agentUnwrap(raw: string, sk: Uint8Array, pk: string): void {
  const ev = JSON.parse(raw) as NostrEvent;
  if (!verifySignedEvent(ev)) throw new Error('bench wrap failed verification');
  const opened = openDm(ev, sk, pk);
  if (!opened.ok) throw new Error(`bench wrap did not open: ${opened.reason}`);
}

function plainUnwrap(raw: string, sk: Uint8Array): void {
  nip17.unwrapEvent(JSON.parse(raw) as NostrEvent, sk);
}

/** nostr-tools doing the same checks as the agent: the wrap's signature too (nip17.unwrapEvent skips it). */
function sameChecksUnwrap(raw: string, sk: Uint8Array): void {
  const ev = JSON.parse(raw) as NostrEvent;
  if (!verifyEvent(ev)) throw new Error('bench wrap failed verification');
  nip17.unwrapEvent(ev, sk);
}

/** Frames handed to the receive path per event-loop turn: about one 64 KiB socket read of ~3 KB gift wraps. */
const FRAMES_PER_TURN = 20;

/**
 * A flood as the agent meets it: every wrap arrives as a frame, FRAMES_PER_TURN
 * per event-loop turn, goes through the relay pool's signature check and then
 * `open`. Measures wall time until every wrap is open and the event-loop delay
 * (monitorEventLoopDelay, 1 ms resolution) meanwhile: how long anything else
 * waiting on the main thread (another request's reply, a relay ping) waits.
 */
async function flood(
  raws: string[],
  open: (ev: NostrEvent) => Promise<{ ok: boolean }> | { ok: boolean },
): Promise<{ wallMs: number; loopP99Ms: number; loopMaxMs: number }> {
  const h = monitorEventLoopDelay({ resolution: 1 });
  h.enable();
  const t0 = performance.now();
  const opened: (Promise<{ ok: boolean }> | { ok: boolean })[] = [];
  for (let i = 0; i < raws.length; i += FRAMES_PER_TURN) {
    for (const r of raws.slice(i, i + FRAMES_PER_TURN)) {
      const ev = JSON.parse(r) as NostrEvent;
      if (!verifySignedEvent(ev)) throw new Error('bench wrap failed verification');
      opened.push(open(ev));
    }
    await new Promise<void>((res) => setImmediate(res));
  }
  const results = await Promise.all(opened);
  const wallMs = performance.now() - t0;
  h.disable();
  if (!results.every((x) => x.ok)) throw new Error('bench wrap did not open');
  return { wallMs, loopP99Ms: h.percentile(99) / 1e6, loopMaxMs: h.max / 1e6 };
}

/**
 * The pool beside nostr-tools and the old synchronous path, back to back on the
 * same wraps: nostr-tools sequential (one thread, no wrap signature check), the
 * agent's previous receive path (openDm synchronously in the frame handler),
 * then the UnwrapPool (fresh, so worker start-up is inside its wall time).
 */
async function benchPool(raws: string[], sk: Uint8Array, pk: string): Promise<PoolResults> {
  let t = performance.now();
  for (const r of raws) plainUnwrap(r, sk);
  const plainMs = performance.now() - t;
  const sync = await flood(raws, (ev) => openDm(ev, sk, pk));
  const pool = new UnwrapPool({ sk, pubkey: pk });
  const pooled = await flood(raws, (ev) => pool.open(ev));
  const stats = pool.stats();
  await pool.close();
  t = performance.now();
  for (const r of raws) plainUnwrap(r, sk);
  const plainAfterMs = performance.now() - t;
  const plainBoth = (plainMs + plainAfterMs) / 2;
  return {
    workers: pool.size,
    nostr_tools_sequential_wall_ms: r1(plainBoth),
    nostr_tools_sequential_runs_ms: [r1(plainMs), r1(plainAfterMs)],
    pool_wall_ms: r1(pooled.wallMs),
    pool_wraps_per_s: Math.round((raws.length / pooled.wallMs) * 1000),
    pool_ratio: r2(plainBoth / pooled.wallMs),
    sync_wall_ms: r1(sync.wallMs),
    sync_ratio: r2(plainBoth / sync.wallMs),
    loop_delay_p99_ms: { pool: r1(pooled.loopP99Ms), sync: r1(sync.loopP99Ms) },
    loop_delay_max_ms: { pool: r1(pooled.loopMaxMs), sync: r1(sync.loopMaxMs) },
    opened_in_workers: stats.openedInWorkers,
    opened_on_main: stats.openedOnMain,
    method: `all ${raws.length} wraps fed ${FRAMES_PER_TURN} frames per event-loop turn, each JSON.parse + relay-pool signature check, then openDm synchronously (sync) or UnwrapPool.open (pool, fresh: worker start-up included; workers are told the wrap signature was checked); ratio = nostr-tools sequential wall (mean of a run before and after) / wall`,
  };
}

/** @rust-nostr/nostr-sdk (a dev dependency) as a third unwrap implementation; undefined when it is not installed. */
async function loadRustNostr(sk: Uint8Array): Promise<{ version: string; unwrap(raw: string): Promise<void> } | undefined> {
  interface Freeable {
    free(): void;
  }
  interface RustNostr {
    loadWasmSync(): void;
    Keys: { parse(secret: string): unknown };
    NostrSigner: { keys(keys: unknown): unknown };
    Event: { fromJson(json: string): Freeable };
    UnwrappedGift: { fromGiftWrap(signer: unknown, ev: Freeable): Promise<Freeable & { rumor: { content: string } }> };
  }
  let mod: RustNostr;
  const name = '@rust-nostr/nostr-sdk';
  try {
    mod = (await import(name)) as RustNostr;
  } catch {
    return undefined;
  }
  mod.loadWasmSync();
  const signer = mod.NostrSigner.keys(mod.Keys.parse(Buffer.from(sk).toString('hex')));
  const version = (JSON.parse(readFileSync(createRequire(import.meta.url).resolve(`${name}/package.json`), 'utf8')) as { version: string }).version;
  return {
    version,
    async unwrap(raw: string) {
      const ev = mod.Event.fromJson(raw);
      try {
        const gift = await mod.UnwrappedGift.fromGiftWrap(signer, ev);
        if (!gift.rumor.content.includes('spawn')) throw new Error('rust-nostr unwrapped something else');
        gift.free();
      } finally {
        ev.free();
      }
    },
  };
}

/** B3 on `wraps` fresh gift wraps from as many senders, in this process. */
export async function benchUnwrap(wraps: number): Promise<UnwrapResults> {
  const sk = generateSecretKey();
  const pk = getPublicKey(sk);
  // 1000 distinct senders: no conversation-key cache hit flatters the fast path.
  const raws: string[] = [];
  const content = JSON.stringify({ type: 'spawn', root_password: 'bench-password-123', plan: 'tiny' });
  for (let i = 0; i < wraps; i++) {
    raws.push(JSON.stringify(sealDmRequest({ sk: generateSecretKey(), recipient: pk, content, channel: 'nip17' }).event));
  }
  // Warm both paths (JIT, WASM tier-up), then alternate in chunks so machine-load swings hit both alike.
  for (const r of raws.slice(0, 20)) {
    plainUnwrap(r, sk);
    sameChecksUnwrap(r, sk);
    agentUnwrap(r, sk, pk);
  }
  const rust = await loadRustNostr(sk);
  if (rust) for (const r of raws.slice(0, 20)) await rust.unwrap(r);
  let plainMs = 0;
  let sameMs = 0;
  let fastMs = 0;
  let rustMs = 0;
  const CHUNK = 50;
  for (let i = 0; i < raws.length; i += CHUNK) {
    const chunk = raws.slice(i, i + CHUNK);
    let t = performance.now();
    for (const r of chunk) plainUnwrap(r, sk);
    plainMs += performance.now() - t;
    t = performance.now();
    for (const r of chunk) sameChecksUnwrap(r, sk);
    sameMs += performance.now() - t;
    t = performance.now();
    for (const r of chunk) agentUnwrap(r, sk, pk);
    fastMs += performance.now() - t;
    if (rust) {
      t = performance.now();
      for (const r of chunk) await rust.unwrap(r);
      rustMs += performance.now() - t;
    }
  }
  const pool = await benchPool(raws, sk, pk);
  const rustSdk: UnwrapResults['rust_nostr_sdk'] = rust
    ? {
        version: rust.version,
        path: 'Event.fromJson + UnwrappedGift.fromGiftWrap (rust-nostr compiled to WASM: two ECDH, seal signature; the wrap signature is not checked, the agent path checks it)',
        ms_per_wrap: r2(rustMs / raws.length),
        wraps_per_s: Math.round((raws.length / rustMs) * 1000),
        agent_ratio: r2(rustMs / fastMs),
      }
    : 'not installed (skipped)';
  return {
    wraps: raws.length,
    senders: raws.length,
    signature_backend: signatureBackend,
    ecdh_backend: ecdhBackend,
    nostr_tools_ms_per_wrap: r2(plainMs / raws.length),
    nostr_tools_wraps_per_s: Math.round((raws.length / plainMs) * 1000),
    agent_ms_per_wrap: r2(fastMs / raws.length),
    agent_wraps_per_s: Math.round((raws.length / fastMs) * 1000),
    ratio: r2(plainMs / fastMs),
    nostr_tools_same_checks_ms_per_wrap: r2(sameMs / raws.length),
    ratio_same_checks: r2(sameMs / fastMs),
    threads: 'ratio / ratio_same_checks: one thread (this process, one core), paths alternate in chunks of 50; pool: see below',
    agent_path: 'relay-pool signature check of the wrap + openDm (seal signature, two ECDH, two NIP-44 decrypts)',
    nostr_tools_path: 'nip17.unwrapEvent (two ECDH, seal signature; no wrap signature check)',
    nostr_tools_same_checks_path: 'verifyEvent(wrap) + nip17.unwrapEvent: the checks the agent makes',
    rust_nostr_sdk: rustSdk,
    pool,
  };
}
