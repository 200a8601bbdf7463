/**
 * The upstream Paygress client's wire shapes against the real agent: untagged
 * JSON over NIP-04 (its default) and NIP-17, replies read raw (decrypted by
 * hand, no v1 client in the way) so the field names are what upstream parses.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { generateSecretKey, getPublicKey } from 'nostr-tools';
import { ConsumerClient } from '../../src/client/consumer.js';
import { openDm, sealDmRequest } from '../../src/nostr/dm.js';
import { RelayPool } from '../../src/nostr/relays.js';
import type { DmChannel, NostrEvent } from '../../src/nostr/types.js';
import { silentLogger } from '../../src/util/logger.js';
import { startRelay, type LocalRelay } from '../support/relay.js';
import { ensureTinyGuest } from '../support/tiny-guest.js';
import { startAgentProcess, type AgentProcess } from '../support/agent-process.js';
import { isListening } from '../support/net.js';

const PORTS = { from: 45320, to: 45329 };
const RELAY_PORT = 45391;
const TOKEN = 'cashuAeyJ0b2tlbiI6W3sibWludCI6Imh0dHBzOi8vbWludC5leGFtcGxlIn1dfQSECRET';
const PASSWORD = 'upstreamPassw0rd42';

let relay: LocalRelay;
let agent: AgentProcess;
const pools: RelayPool[] = [];

/** An upstream-style consumer: sends raw JSON, reads the first DM from the provider. */
async function upstreamConsumer() {
  const sk = generateSecretKey();
  const pubkey = getPublicKey(sk);
  const inbox: Array<{ event: NostrEvent; body: Record<string, any>; channel: DmChannel }> = [];
  const pool = new RelayPool({ urls: [relay.url], logger: silentLogger });
  pools.push(pool);
  pool.start();
  pool.subscribe([{ kinds: [4, 1059], '#p': [pubkey], since: Math.floor(Date.now() / 1000) - 3 * 24 * 3600 }], (event) => {
    const opened = openDm(event, sk, pubkey);
    if (opened.ok && opened.dm.sender === agent.pubkey) inbox.push({ event, body: JSON.parse(opened.dm.content), channel: opened.dm.channel });
  });
  await pool.waitConnected(5_000);
  return {
    sk,
    pubkey,
    async ask(body: Record<string, unknown>, channel: DmChannel = 'nip04', timeoutMs = 60_000) {
      const { event, requestId } = sealDmRequest({ sk, recipient: agent.pubkey, content: JSON.stringify(body), channel });
      await pool.publish(event);
      // Match on the v1 request_id the reply also carries: the provider's
      // unprompted `ready` notice for the spawn may arrive in between.
      const end = Date.now() + timeoutMs;
      for (;;) {
        const reply = inbox.find((m) => m.body.request_id === requestId);
        if (reply) return reply;
        if (Date.now() > end) throw new Error('no reply');
        await new Promise((r) => setTimeout(r, 100));
      }
    },
  };
}

beforeAll(async () => {
  relay = await startRelay({ port: RELAY_PORT });
  agent = await startAgentProcess({ relays: [relay.url], guest: await ensureTinyGuest(), portRange: PORTS });
});

afterAll(async () => {
  await Promise.all(pools.map((p) => p.close()));
  await agent?.stop();
  await relay?.stop();
});

describe('upstream client shapes', () => {
  it('spawn over NIP-04 gets upstream access details whose host and port answer; status by pod_npub; strangers get not_found', async () => {
    const owner = await upstreamConsumer();
    const spawn = { cashu_token: TOKEN, pod_spec_id: 'tiny', pod_image: 'ubuntu:22.04', ssh_username: 'alice', ssh_password: PASSWORD };
    const { event, body, channel } = await owner.ask(spawn);
    // Replies go back on the scheme the request used, addressed to the sender.
    expect(channel).toBe('nip04');
    expect(event.kind).toBe(4);
    expect(event.tags).toContainEqual(['p', owner.pubkey]);
    expect(body).toMatchObject({
      pod_npub: expect.stringMatching(/^container-w-[0-9a-f]{12}$/),
      node_port: expect.any(Number),
      cpu_millicores: 1000,
      memory_mb: 256,
      pod_spec_name: 'Tiny',
      pod_spec_description: 'test plan',
      host_address: '127.0.0.1',
      instructions: expect.arrayContaining([`ssh -p ${body.node_port} root@127.0.0.1`]),
      // v1 fields ride along
      type: 'access_details',
      ssh_port: body.node_port,
    });
    expect(body.expires_at).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/);
    expect(Date.parse(body.expires_at)).toBeGreaterThan(Date.now());
    expect(body.node_port).toBeGreaterThanOrEqual(PORTS.from);
    expect(body.node_port).toBeLessThanOrEqual(PORTS.to);
    expect(await isListening(body.node_port, body.host_address)).toBe(true);

    const status = await owner.ask({ pod_id: body.pod_npub });
    expect(status.body).toMatchObject({
      pod_id: body.pod_npub,
      status: 'running',
      expires_at: body.expires_at,
      cpu_millicores: 1000,
      memory_mb: 256,
      ssh_host: '127.0.0.1',
      ssh_port: body.node_port,
      ssh_username: 'root',
    });
    expect(status.body.time_remaining_seconds).toBeGreaterThan(3000);

    // The same status over NIP-17 answers over NIP-17.
    const status17 = await owner.ask({ pod_id: body.pod_npub }, 'nip17');
    expect(status17.channel).toBe('nip17');
    expect(status17.body).toMatchObject({ pod_id: body.pod_npub, status: 'running' });

    const stranger = await upstreamConsumer();
    const refused = await stranger.ask({ pod_id: body.pod_npub });
    expect(refused.body).toMatchObject({ error_type: 'not_found', message: expect.any(String), details: null, type: 'error', code: 'not_found' });
    expect(await isListening(body.node_port)).toBe(true);

    // Upstream has no stop; a v1 client with the owner's key stops it.
    const v1 = new ConsumerClient({ sk: owner.sk, provider: agent.pubkey, relays: [relay.url], channel: 'nip04' });
    await v1.start();
    try {
      const stopped = await v1.request({ type: 'stop', workload_id: body.workload_id }, { timeoutMs: 30_000 });
      expect(stopped).toMatchObject({ type: 'stopped', workload_id: body.workload_id });
    } finally {
      await v1.close();
    }

    // The token was ignored: it appears nowhere in the agent's output.
    expect(agent.output()).not.toContain('cashuA');
    expect(agent.output()).not.toContain(PASSWORD);
  });

  it('answers a top-up and a bad spec with upstream error shapes', async () => {
    const c = await upstreamConsumer();
    const topup = await c.ask({ pod_npub: 'container-w-0123456789ab', cashu_token: TOKEN });
    expect(topup.body).toMatchObject({ error_type: 'topup_not_supported', details: null });
    const bad = await c.ask({ cashu_token: TOKEN, pod_spec_id: 'premium', pod_image: 'x', ssh_username: 'root', ssh_password: PASSWORD });
    expect(bad.body).toMatchObject({ error_type: 'invalid_spec', code: 'unknown_plan' });
    expect(JSON.stringify(bad.body)).not.toContain(PASSWORD);
  });
});
