/**
 * The `paygress` consumer CLI as a user runs it: a real process, a real relay,
 * the real agent.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync, statSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { generateSecretKey, getPublicKey } from 'nostr-tools';
import { npubEncode } from 'nostr-tools/nip19';
import { startRelay, type LocalRelay } from '../support/relay.js';
import { ensureTinyGuest } from '../support/tiny-guest.js';
import { startAgentProcess, type AgentProcess } from '../support/agent-process.js';
import { isListening } from '../support/net.js';

const CLI = new URL('../../src/cli/consumer.ts', import.meta.url).pathname;
let relay: LocalRelay;
let agent: AgentProcess;
let home: string;

function paygress(args: string[], env: Record<string, string> = {}) {
  return execa('node', ['--import', 'tsx', CLI, ...args], {
    reject: false,
    stdin: 'ignore',
    env: { XDG_CONFIG_HOME: join(home, 'config'), ...env },
    timeout: 90_000,
  });
}

beforeAll(async () => {
  home = mkdtempSync(join(tmpdir(), 'pga-cli-'));
  relay = await startRelay();
  agent = await startAgentProcess({ relays: [relay.url], guest: await ensureTinyGuest(), portRange: { from: 43330, to: 43339 } });
});

afterAll(async () => {
  await agent?.stop();
  await relay?.stop();
});

describe('paygress CLI', () => {
  it('keygen makes a 0600 key once and prints the same npub every time', async () => {
    const first = await paygress(['keygen']);
    expect(first.exitCode).toBe(0);
    expect(first.stdout).toMatch(/^npub1[0-9a-z]+$/);
    const keyFile = join(home, 'config', 'paygress', 'consumer.nsec');
    expect(statSync(keyFile).mode & 0o777).toBe(0o600);
    expect((await paygress(['keygen'])).stdout).toBe(first.stdout);
  });

  it('spawn --json prints the access details; status and stop work by workload id', async () => {
    const provider = npubEncode(agent.pubkey);
    const common = ['--provider', provider, '--relay', relay.url, '--json'];
    const spawn = await paygress(['spawn', ...common], { PAYGRESS_ROOT_PASSWORD: 'a password from the environment' });
    expect(spawn.exitCode, spawn.stderr).toBe(0);
    const details = JSON.parse(spawn.stdout.trim().split('\n')[0]!);
    expect(details).toMatchObject({ type: 'access_details', host: '127.0.0.1', ssh_user: 'root' });
    expect(await isListening(details.ssh_port)).toBe(true);
    // The password came from the environment: it is not echoed back.
    expect(spawn.stdout).not.toContain('a password from the environment');

    const status = await paygress(['status', ...common, details.workload_id]);
    expect(status.exitCode).toBe(0);
    expect(JSON.parse(status.stdout)).toMatchObject({ type: 'status', state: 'running', workload_id: details.workload_id });

    const stop = await paygress(['stop', ...common, details.workload_id]);
    expect(stop.exitCode).toBe(0);
    expect(JSON.parse(stop.stdout)).toMatchObject({ type: 'stopped' });
    expect(existsSync(join(agent.vmRoot, details.workload_id))).toBe(false);
  });

  it('human output names host and port; an error reply exits 2', async () => {
    const common = ['--provider', agent.pubkey, '--relay', relay.url];
    const status = await paygress(['status', ...common, 'w-000000000000']);
    expect(status.exitCode).toBe(2);
    expect(status.stderr).toContain('error not_found');
  });

  it('no reply in time: a clear message and exit 3', async () => {
    const nobody = getPublicKey(generateSecretKey());
    const r = await paygress(['status', '--provider', nobody, '--relay', relay.url, '--timeout', '2', 'w-000000000000']);
    expect(r.exitCode).toBe(3);
    expect(r.stderr).toMatch(/no reply from the provider within 2 s: is the provider online/);
  });

  it('usage errors exit 64', async () => {
    expect((await paygress(['spawn'])).exitCode).toBe(64);
    expect((await paygress(['frobnicate', '--provider', agent.pubkey, '--relay', relay.url])).exitCode).toBe(64);
  });
});
