/**
 * Floods and clocks against the live agent (child process), through a
 * scripted relay (test/support/hostile-relay.ts):
 * - a request dated an hour ahead is refused with `clock_skew`, remembered
 *   from its own date, and not run after a restart either;
 * - hundreds of fresh keys flood a one-slot agent with a 4-request queue:
 *   the overflow is answered `busy` (at most once per sender), nothing is
 *   answered twice, and a tenant's request that arrives behind the flood is
 *   served before the strangers that were waiting when it came.
 * Order is read from the agent's log; nothing here measures time.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createRumor, createSeal, createWrap } from 'nostr-tools/nip59';
import { startHostileRelay, type HostileRelay } from '../support/hostile-relay.js';
import { answersByRequest, freshKey, sealRequest, type Answer, type Key, type SentRequest } from '../support/replies.js';
import { ensureTinyGuest, type TinyGuest } from '../support/tiny-guest.js';
import { startAgentProcess, type AgentProcess } from '../support/agent-process.js';
import { qemuPidsMatching, until } from '../support/net.js';

const RELAY_PORT = 47101;
const VM_PORTS = { from: 47120, to: 47129 };
/** A status request for a workload nobody has (`not_found`); each one distinct, so no two share a rumor id. */
const status = (): Record<string, unknown> => ({ type: 'status', workload_id: `w-${randomBytes(6).toString('hex')}` });
const MAX_QUEUED = 4;
const FLOOD = 200;

let relay: HostileRelay;
let agent: AgentProcess;
let guest: TinyGuest;
const keys: Key[] = [];

function key(): Key {
  const k = freshKey();
  keys.push(k);
  return k;
}

const eventFrame = (ev: unknown): string => JSON.stringify(['EVENT', relay.subId(), ev]);

function request(from: Key, body: Record<string, unknown> = status()): SentRequest {
  return sealRequest(from, agent.pubkey, body);
}

const answers = (): Map<string, Answer[]> => answersByRequest(relay.published, keys);

async function answerTo(r: { requestId: string }, what = 'an answer', accept: (a: Answer) => boolean = () => true): Promise<Answer> {
  let found: Answer | undefined;
  await until(() => (found = answers().get(r.requestId)?.find(accept)) !== undefined, 180_000, `${what} to ${r.requestId}`);
  return found!;
}

function start(root?: string): Promise<AgentProcess> {
  return startAgentProcess({
    relays: [relay.url],
    guest,
    portRange: VM_PORTS,
    // The machine may be loaded by other suites: starting under tsx can take a while.
    startTimeoutMs: 120_000,
    ...(root ? { root, sk: agent.sk } : {}),
    overrides: { limits: { maxConcurrentRequests: 1, maxQueuedRequests: MAX_QUEUED }, discovery: { enabled: false } },
  });
}

beforeAll(async () => {
  guest = await ensureTinyGuest();
  relay = await startHostileRelay(RELAY_PORT);
  agent = await start();
  await relay.req(1);
});

afterAll(async () => {
  await agent?.stop();
  for (const pid of qemuPidsMatching(agent?.vmRoot ?? '/nonexistent')) process.kill(pid, 'SIGKILL');
  await relay?.close();
});

/** Log lines of the agent as objects, in order. */
function logLines(): Array<Record<string, unknown>> {
  return agent
    .output()
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

describe('time', () => {
  it('a request dated an hour ahead: clock_skew, kept from its own date, not run after a restart', async () => {
    const skewed = key();
    const now = Math.floor(Date.now() / 1000);
    const rumor = createRumor({ kind: 14, created_at: now + 3600, tags: [['p', agent.pubkey]], content: JSON.stringify(status()) }, skewed.sk);
    const wrap = createWrap(createSeal(rumor, skewed.sk, agent.pubkey), agent.pubkey);
    // A minute ahead is ordinary clock drift: answered as usual.
    const drift = createRumor({ kind: 14, created_at: now + 60, tags: [['p', agent.pubkey]], content: JSON.stringify(status()) }, skewed.sk);
    const driftWrap = createWrap(createSeal(drift, skewed.sk, agent.pubkey), agent.pubkey);
    relay.store(() => eventFrame(wrap));
    relay.send(eventFrame(wrap));
    relay.send(eventFrame(driftWrap));

    expect((await answerTo({ requestId: rumor.id })).body).toMatchObject({ type: 'error', code: 'clock_skew' });
    expect((await answerTo({ requestId: drift.id })).body).toMatchObject({ type: 'error', code: 'not_found' });
    const seen = readFileSync(join(agent.stateDir, 'seen.log'), 'utf8').split('\n');
    expect(seen).toContain(`${rumor.created_at} ${rumor.id}`);

    // The relay sends it again to the restarted agent: no second answer.
    await agent.stop();
    agent = await start(agent.root);
    await relay.req(2);
    const barrier = request(key());
    relay.send(eventFrame(barrier.event));
    await answerTo(barrier);
    expect(answers().get(rumor.id)).toHaveLength(1);
  }, 300_000);
});

describe('a flood of fresh keys', () => {
  it('overflow is answered busy once per sender; a tenant behind the flood is served before the strangers waiting', async () => {
    // A tenant: holds a workload, so its requests take the tenant lane.
    const tenant = key();
    const spawn = request(tenant, { type: 'spawn', root_password: 'flood-test-password' });
    relay.send(eventFrame(spawn.event));
    const details = await answerTo(spawn, 'access details', (a) => a.body.type === 'access_details' || a.body.type === 'error');
    expect(details.body.type).toBe('access_details');
    console.log('flood test: the tenant has a workload; flooding');

    // The one processing slot is taken by a request whose reply gets no OK: it stays taken for the publish timeout.
    const blockerKey = key();
    relay.holdOk = (ev) => ev.tags.some((t) => t[0] === 'p' && t[1] === blockerKey.pubkey);
    const before = relay.published.length;
    const blocker = request(blockerKey);
    relay.send(eventFrame(blocker.event));
    await until(() => relay.published.slice(before).some((ev) => relay.holdOk(ev)), 120_000, 'the blocking reply');

    const flood = Array.from({ length: FLOOD }, () => request(key()));
    const repeater = key();
    const repeats = [request(repeater), request(repeater), request(repeater)];
    flood.splice(FLOOD / 2, 0, ...repeats);
    const tenantStatus = request(tenant, { type: 'status', workload_id: details.body.workload_id });
    for (const r of [...flood, tenantStatus]) relay.send(eventFrame(r.event));

    expect((await answerTo(tenantStatus)).body).toMatchObject({ type: 'status', workload_id: details.body.workload_id });
    console.log('flood test: tenant answered');
    const others = flood.filter((r) => !repeats.includes(r));
    await until(() => others.every((r) => answers().has(r.requestId)), 180_000, 'an answer to every flood request');
    await new Promise((r) => setTimeout(r, 3000));

    // Exactly one answer each, its own or busy; never both, never two.
    const a = answers();
    const codes = others.map((r) => {
      const got = a.get(r.requestId)!;
      expect(got, r.requestId).toHaveLength(1);
      return got[0]!.body.code;
    });
    expect(codes.every((c) => c === 'not_found' || c === 'busy')).toBe(true);
    const busy = codes.filter((c) => c === 'busy').length;
    expect(busy).toBeGreaterThan(0);
    // A sender over a full queue hears busy at most once per interval.
    const repeaterBusy = repeats.flatMap((r) => a.get(r.requestId) ?? []).filter((x) => x.body.code === 'busy');
    expect(repeaterBusy.length).toBeLessThanOrEqual(1);

    // Order, from the log: the tenant's request was queued behind waiting strangers and still ran before them.
    const lines = logLines();
    const at = (msg: string, requestId: string): number => lines.findIndex((l) => l.msg === msg && l.requestId === requestId);
    const tenantQueued = at('request queued', tenantStatus.requestId);
    const tenantRan = at('request', tenantStatus.requestId);
    expect(tenantQueued, 'the tenant request never waited: nothing to jump').toBeGreaterThanOrEqual(0);
    const waiting = others.filter((r) => {
      const q = at('request queued', r.requestId);
      const ran = at('request', r.requestId);
      return q >= 0 && q < tenantQueued && (ran < 0 || ran > tenantQueued);
    });
    expect(waiting.length, 'no stranger was waiting when the tenant request came').toBeGreaterThan(0);
    for (const r of waiting) expect(at('request', r.requestId)).toBeGreaterThan(tenantRan);
    console.log(`flood: ${others.length} strangers, ${busy} answered busy, ${waiting.length} waiting when the tenant's request came; the tenant's ran before all of them`);

    await agent.stop();
    const stats = lines.length ? (JSON.parse(agent.output().split('\n').find((l) => l.includes('stats at shutdown'))!) as { requests: { refused: { busy: number }; queue: { queuedPeak: number } } }) : undefined;
    expect(stats?.requests.refused.busy).toBeGreaterThanOrEqual(busy);
    // Both lanes together never held more than their bounds.
    expect(stats?.requests.queue.queuedPeak).toBeLessThanOrEqual(2 * MAX_QUEUED);
  }, 600_000);
});
