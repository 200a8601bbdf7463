/**
 * Discovery with real parts: the agent CLI as a child process publishes its
 * offer and heartbeats to a local relay; the consumer CLI's `list` reads them.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cpus, totalmem } from 'node:os';
import { execa } from 'execa';
import { generateSecretKey } from 'nostr-tools';
import { npubEncode } from 'nostr-tools/nip19';
import { ConsumerClient } from '../../src/client/consumer.js';
import { RelayPool } from '../../src/nostr/relays.js';
import type { NostrEvent } from '../../src/nostr/types.js';
import { silentLogger } from '../../src/util/logger.js';
import { startRelay, type LocalRelay } from '../support/relay.js';
import { ensureTinyGuest } from '../support/tiny-guest.js';
import { startAgentProcess, type AgentProcess } from '../support/agent-process.js';
import { until } from '../support/net.js';

const CLI = new URL('../../src/cli/consumer.ts', import.meta.url).pathname;
const PORTS = { from: 45300, to: 45309 };
const RELAY_PORT = 45390;

let relay: LocalRelay;
let agent: AgentProcess;
let watcher: RelayPool;
const events: NostrEvent[] = [];

const content = (ev: NostrEvent) => JSON.parse(ev.content) as Record<string, any>;
const ofKind = (kind: number) => events.filter((e) => e.kind === kind && e.pubkey === agent.pubkey);

beforeAll(async () => {
  relay = await startRelay({ port: RELAY_PORT });
  agent = await startAgentProcess({
    relays: [relay.url],
    guest: await ensureTinyGuest(),
    portRange: PORTS,
    overrides: {
      provider: { name: 'disco provider', location: 'Lab' },
      plans: [
        { id: 'tiny', name: 'Tiny', description: 'test plan', vcpus: 1, memoryMb: 256, diskGb: 2, durationSeconds: 3600, rateMsatsPerSec: 5 },
        { id: 'cloud', name: 'Cloud', description: 'cloud-init guest', vcpus: 2, memoryMb: 1024, diskGb: 4, durationSeconds: 3600 },
      ],
      discovery: { heartbeatSeconds: 1, apiEndpoint: 'https://provider.example/api' },
    },
  });
  watcher = new RelayPool({ urls: [relay.url], logger: silentLogger });
  watcher.start();
  watcher.subscribe([{ kinds: [38383, 38384, 20384], authors: [agent.pubkey] }], (ev) => events.push(ev));
  await watcher.waitConnected(5_000);
});

afterAll(async () => {
  await watcher?.close();
  await agent?.stop();
  await relay?.stop();
});

describe('discovery events', () => {
  it('publishes the offer in the upstream shape', async () => {
    await until(() => ofKind(38383).length > 0, 15_000, 'an offer');
    const offer = ofKind(38383)[0]!;
    expect(offer.tags).toEqual(
      expect.arrayContaining([['d', `paygress:offer:v1:${agent.pubkey}`], ['t', 'paygress'], ['t', 'compute'], ['v', '1']]),
    );
    expect(content(offer)).toEqual({
      provider_npub: agent.pubkey,
      hostname: 'disco provider',
      location: 'Lab',
      capabilities: ['vm', 'kvm', 'ssh'],
      specs: [
        { id: 'tiny', name: 'Tiny', description: 'test plan', cpu_millicores: 1000, memory_mb: 256, rate_msats_per_sec: 5 },
        { id: 'cloud', name: 'Cloud', description: 'cloud-init guest', cpu_millicores: 2000, memory_mb: 1024, rate_msats_per_sec: 0 },
      ],
      whitelisted_mints: [],
      uptime_percent: 100,
      total_jobs_completed: 0,
      api_endpoint: 'https://provider.example/api',
      version: 1,
      isolation_level: 'dedicated-host',
    });
  });

  it('publishes both heartbeats every beat with the minute-bucket d tag and host capacity', async () => {
    await until(() => ofKind(38384).length >= 2 && ofKind(20384).length >= 2, 15_000, 'two heartbeats of each kind');
    for (const hb of [...ofKind(38384), ...ofKind(20384)]) {
      const c = content(hb);
      expect(Object.keys(c).sort()).toEqual(['active_workloads', 'available_capacity', 'provider_npub', 'timestamp', 'version']);
      expect(c).toMatchObject({ provider_npub: agent.pubkey, version: 1 });
      expect(Math.abs(c.timestamp - hb.created_at)).toBeLessThanOrEqual(1);
      expect(Object.keys(c.available_capacity).sort()).toEqual(['cpu_available', 'memory_mb_available', 'storage_gb_available']);
      expect(c.available_capacity.storage_gb_available).toBeGreaterThan(0);
    }
    const hb = ofKind(38384).at(-1)!;
    expect(hb.tags).toContainEqual(['d', `paygress:heartbeat:v1:${agent.pubkey}:${Math.floor(content(hb).timestamp / 60)}`]);
    // No workload yet: the whole host is free.
    const idle = content(ofKind(20384).at(-1)!);
    expect(idle.active_workloads).toBe(0);
    expect(idle.available_capacity.cpu_available).toBe(cpus().length * 1000);
    expect(idle.available_capacity.memory_mb_available).toBe(Math.floor(totalmem() / 1024 ** 2));
  });

  it('capacity drops by the plan once a VM runs, and comes back after stop', async () => {
    const before = content(ofKind(20384).at(-1)!).available_capacity;
    const client = new ConsumerClient({ sk: generateSecretKey(), provider: agent.pubkey, relays: [relay.url] });
    await client.start();
    try {
      const reply = await client.request({ type: 'spawn', root_password: 'discovery test password', plan: 'tiny' }, { timeoutMs: 60_000 });
      expect(reply.type).toBe('access_details');
      const spawnedAt = Math.floor(Date.now() / 1000);
      await until(() => ofKind(20384).some((e) => e.created_at > spawnedAt && content(e).active_workloads === 1), 15_000, 'a heartbeat with the VM');
      const busy = content(ofKind(20384).find((e) => e.created_at > spawnedAt && content(e).active_workloads === 1)!).available_capacity;
      expect(busy.memory_mb_available).toBe(before.memory_mb_available - 256);
      expect(busy.cpu_available).toBe(before.cpu_available - 1000);
      expect(busy.storage_gb_available).toBeLessThanOrEqual(before.storage_gb_available - 2);

      await client.request({ type: 'stop', workload_id: reply.workload_id }, { timeoutMs: 30_000 });
      const stoppedAt = Math.floor(Date.now() / 1000);
      await until(() => ofKind(20384).some((e) => e.created_at > stoppedAt && content(e).active_workloads === 0), 15_000, 'an idle heartbeat');
      const idle = content(ofKind(20384).find((e) => e.created_at > stoppedAt && content(e).active_workloads === 0)!).available_capacity;
      expect(idle.memory_mb_available).toBe(before.memory_mb_available);
    } finally {
      await client.close();
    }
  });
});

describe('paygress list', () => {
  it('shows the provider online with its tier, plans and capacity (--json and text)', async () => {
    const run = (args: string[]) =>
      execa('node', ['--import', 'tsx', CLI, 'list', '--relay', relay.url, ...args], { reject: false, stdin: 'ignore', timeout: 60_000 });
    const json = await run(['--json']);
    expect(json.exitCode, json.stderr).toBe(0);
    const providers = JSON.parse(json.stdout) as Array<Record<string, any>>;
    const me = providers.find((p) => p.pubkey === agent.pubkey);
    expect(me).toMatchObject({
      npub: npubEncode(agent.pubkey),
      name: 'disco provider',
      location: 'Lab',
      isolation_level: 'dedicated-host',
      online: true,
      active_workloads: 0,
      api_endpoint: 'https://provider.example/api',
    });
    expect(me!.specs.map((s: { id: string }) => s.id)).toEqual(['tiny', 'cloud']);
    expect(me!.available_capacity.memory_mb_available).toBeGreaterThan(0);

    const text = await run([]);
    expect(text.exitCode, text.stderr).toBe(0);
    expect(text.stdout).toContain(`online  ${npubEncode(agent.pubkey)}  disco provider (Lab)`);
    expect(text.stdout).toContain('plan tiny: Tiny, 1 vCPU, 256 MB, 5 msat/s');
  });

  it('shows a provider whose heartbeats stopped as offline', async () => {
    await agent.stop();
    // The stored 38384s are still there but the window is judged by the caller's clock: fake an old world with a short window.
    const { buildDirectory } = await import('../../src/discovery/directory.js');
    const later = Math.floor(Date.now() / 1000) + 181;
    const entry = buildDirectory(events, later).find((p) => p.pubkey === agent.pubkey);
    expect(entry).toMatchObject({ online: false, name: 'disco provider' });
  });
});
