/**
 * A hostile relay against the live agent (child process): the relay is a
 * scripted WebSocket server (test/support/hostile-relay.ts) that mixes valid
 * requests with everything a relay could send to break a client — valid gift
 * wraps carrying an unsigned 20 000-deep array (the signature still
 * verifies: only signed fields are hashed), deep arrays as raw JSON, multi-MB
 * frames, a frame over the hard cap that costs the connection, junk, unknown
 * verbs, events for other subscriptions, NOTICE/CLOSED/EOSE/OK spam. The
 * agent must stay up and answer every valid request exactly once, on this
 * connection and on the one it opens after the hard-cap frame.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { finalizeEvent } from 'nostr-tools/pure';
import { startHostileRelay, type HostileRelay } from '../support/hostile-relay.js';
import { answersByRequest, deepArray, eventFrameWithExtra, freshKey, sealRequest, type Key, type SentRequest } from '../support/replies.js';
import { ensureTinyGuest } from '../support/tiny-guest.js';
import { startAgentProcess, type AgentProcess } from '../support/agent-process.js';
import { until } from '../support/net.js';

const RELAY_PORT = 47100;
const VM_PORTS = { from: 47110, to: 47119 };
/** A status request for a workload nobody has (`not_found`); each one distinct, so no two share a rumor id. */
const status = (): Record<string, unknown> => ({ type: 'status', workload_id: `w-${randomBytes(6).toString('hex')}` });

let relay: HostileRelay;
let agent: AgentProcess;
const keys: Key[] = Array.from({ length: 8 }, () => freshKey());

beforeAll(async () => {
  const guest = await ensureTinyGuest();
  relay = await startHostileRelay(RELAY_PORT);
  agent = await startAgentProcess({
    relays: [relay.url],
    guest,
    portRange: VM_PORTS,
    // The machine may be loaded by other suites: starting under tsx can take a while.
    startTimeoutMs: 120_000,
    // Every valid request is to be answered with its own answer, never `busy`.
    overrides: { limits: { maxQueuedRequests: 10_000 }, discovery: { enabled: false } },
  });
});

afterAll(async () => {
  await agent?.stop();
  await relay?.close();
});

function shuffle<T>(items: T[]): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [items[i], items[j]] = [items[j]!, items[i]!];
  }
  return items;
}

function valid(n: number): SentRequest[] {
  return Array.from({ length: n }, (_, i) => sealRequest(keys[i % keys.length]!, agent.pubkey, status(), i % 4 === 3 ? 'nip04' : 'nip17'));
}

const eventFrame = (subId: string, ev: unknown): string => JSON.stringify(['EVENT', subId, ev]);

/** Everything here must be dropped without an answer and without harm. */
function junk(subId: string, forOthers: SentRequest[]): Array<string | Buffer> {
  const someone = freshKey();
  const signedDeepTags = finalizeEvent({ kind: 1059, created_at: Math.floor(Date.now() / 1000), tags: [['p', agent.pubkey]], content: 'x' }, someone.sk);
  const deepTags = JSON.stringify(['EVENT', subId, { ...signedDeepTags, tags: '__DEEP__' }]).replace('"__DEEP__"', deepArray(20_000));
  const manyTags = eventFrame(subId, { ...signedDeepTags, tags: Array.from({ length: 5000 }, () => ['p', agent.pubkey]) });
  return [
    'hello',
    '',
    '{}',
    '[]',
    '[1,2,3]',
    'null',
    '"EVENT"',
    randomBytes(4096),
    deepArray(100_000),
    `["EVENT",${JSON.stringify(subId)},${deepArray(50_000)}]`,
    deepTags,
    manyTags,
    '["EVENT"]',
    `["EVENT",${JSON.stringify(subId)}]`,
    `["EVENT",${JSON.stringify(subId)},null]`,
    `["EVENT",${JSON.stringify(subId)},{"id":1}]`,
    `["EVENT",{"a":1},{}]`,
    '["FOO","bar"]',
    '["COUNT","x",{"count":1}]',
    `["AUTH","${randomBytes(16).toString('hex')}"]`,
    ...Array.from({ length: 100 }, (_, i) => JSON.stringify(['NOTICE', `spam ${i} ${'n'.repeat(500)}`])),
    ...Array.from({ length: 30 }, () => JSON.stringify(['CLOSED', subId, 'error: go away'])),
    ...Array.from({ length: 30 }, () => JSON.stringify(['EOSE', subId])),
    ...Array.from({ length: 30 }, () => JSON.stringify(['OK', randomBytes(32).toString('hex'), true, ''])),
    // Valid requests, but for a subscription the agent never made.
    ...forOthers.map((r) => eventFrame('not-yours', r.event)),
    // A 5 MB event: over the parse cap, dropped unread; the connection stays.
    eventFrame(subId, { ...signedDeepTags, content: 'a'.repeat(5 * 1024 * 1024) }),
    Buffer.alloc(3 * 1024 * 1024, 0x5b),
  ];
}

describe('a hostile relay', () => {
  it('cannot crash the agent: every valid request is answered exactly once, junk never', async () => {
    const sub1 = await relay.req(1);
    const plain = valid(200);
    // Valid requests whose events carry an unsigned 20 000-deep array (they crashed the agent before).
    const decorated = valid(40);
    const forOthers = valid(10);
    // Stored like a relay stores events: sent again after every REQ (the agent must not answer twice).
    for (const r of plain) relay.store((subId) => eventFrame(subId, r.event));
    const frames: Array<string | Buffer> = shuffle([
      ...plain.slice(0, 50).map((r) => eventFrame(sub1, r.event)), // duplicates of stored ones
      ...decorated.map((r) => eventFrameWithExtra(sub1, r.event, deepArray(20_000))),
      ...junk(sub1, forOthers),
    ]);
    for (const f of frames) relay.send(f);

    // Over the hard cap: the agent drops the connection, reconnects and subscribes again.
    relay.send(eventFrame(sub1, { content: 'b'.repeat(17 * 1024 * 1024) }));
    const exited = agent.proc.then((r) => {
      throw new Error(`the agent exited (${r.exitCode}):\n${agent.output().slice(-3000)}`);
    });
    const sub2 = await Promise.race([relay.req(2, 120_000), exited]);
    const late = valid(20);
    for (const r of late) relay.send(eventFrame(sub2, r.event));

    const expected = [...plain, ...decorated, ...late];
    const answered = () => answersByRequest(relay.published, keys);
    await until(() => {
      if (agent.proc.exitCode !== null) throw new Error(`the agent exited (${agent.proc.exitCode}):\n${agent.output().slice(-3000)}`);
      const a = answered();
      return expected.every((r) => a.has(r.requestId));
    }, 180_000, 'an answer to every valid request');
    // Time for a second answer to show up, were one coming.
    await new Promise((r) => setTimeout(r, 3000));

    const a = answered();
    for (const r of expected) {
      const got = a.get(r.requestId) ?? [];
      expect(got, `${r.requestId}: ${JSON.stringify(got)}\n${agent.output().split('\n').filter((l) => /will retry|disconnected|connected|timeout/.test(l)).slice(0, 20).join('\n')}`).toHaveLength(1);
      expect(got[0]!.body).toMatchObject({ type: 'error', code: 'not_found' });
      expect(got[0]!.to).toBe(r.from.pubkey);
    }
    for (const r of forOthers) expect(a.has(r.requestId), `${r.requestId} ${JSON.stringify(a.get(r.requestId))}\n${agent.output().split('\n').filter((l) => l.includes(r.requestId) || l.includes(r.event.id)).join('\n')}`).toBe(false);
    // Nothing the agent published is an answer to something else.
    expect([...a.keys()].every((id) => expected.some((r) => r.requestId === id))).toBe(true);
    expect(agent.proc.exitCode).toBeNull();
    expect(relay.connections()).toBe(2);

    await agent.stop();
    const line = agent.output().split('\n').find((l) => l.includes('stats at shutdown'));
    expect(line).toBeDefined();
    const stats = JSON.parse(line!) as { relays: { dropped: Record<string, number>; delivered: number }; requests: { received: number; duplicates: number } };
    expect(stats.relays.dropped.unknown_subscription).toBeGreaterThanOrEqual(forOthers.length);
    for (const reason of ['oversize_frame', 'junk_frame', 'unknown_verb', 'bad_shape', 'duplicate']) {
      expect(stats.relays.dropped[reason], reason).toBeGreaterThan(0);
    }
    expect(stats.requests.received).toBe(expected.length);
  }, 600_000);
});
