/**
 * Full disks never end the agent (issue 11, item 3), against the real agent
 * CLI, a real relay and the tiny guest. The state dir and the VM root are
 * small tmpfs mounts of their own:
 *  - a VM root without room for another overlay's diskGb: the spawn is
 *    answered capacity_exhausted and nothing is made;
 *  - a full state dir: requests are held unanswered (their at-most-once claim
 *    cannot be written), leases still expire, the agent restarts fine;
 *  - space back: every held request is answered exactly once, also across a
 *    further restart.
 */
import { appendFileSync, existsSync, mkdirSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { generateSecretKey } from 'nostr-tools';
import { ConsumerClient, type ReplyMessage } from '../../src/client/consumer.js';
import { checkDiskSpace, checkWritableDir } from '../../src/doctor/checks.js';
import { startAgentProcess, type AgentProcess } from '../support/agent-process.js';
import { qemuPidsMatching, until } from '../support/net.js';
import { startRelay, type LocalRelay } from '../support/relay.js';
import { ensureTinyGuest, type TinyGuest } from '../support/tiny-guest.js';
import { mountTmpfs, type Tmpfs } from '../support/tmpfs.js';

/** This file's ports: VMs 47220-47239, relay 47250. */
const PORTS = { from: 47220, to: 47239 };
const RELAY_PORT = 47250;
const LEASE_SECONDS = 40;

let guest: TinyGuest;
let relay: LocalRelay;
let root: Tmpfs;
let state: Tmpfs;
let vms: Tmpfs;
let agent: AgentProcess | undefined;
let consumer: ConsumerClient;
const replies: ReplyMessage[] = [];
const repliesTo = (id: string) => replies.filter((r) => r.request_id === id);

function start(): Promise<AgentProcess> {
  return startAgentProcess({
    relays: [relay.url],
    guest,
    portRange: PORTS,
    root: root.dir,
    sk: agent?.sk ?? sk,
    overrides: {
      stateDir: state.dir,
      plans: [{ id: 'tiny', name: 'Tiny', vcpus: 1, memoryMb: 256, diskGb: 1, durationSeconds: LEASE_SECONDS }],
      limits: { diskReserveGb: 0 },
      leases: { checkIntervalMs: 500, warnBeforeSeconds: 0 },
      drivers: { kvm: { vmRoot: join(vms.dir, 'vms'), overlayTemplateDir: join(vms.dir, 'templates') } },
      discovery: { enabled: false },
    },
  });
}
const sk = generateSecretKey();

function padToPage(file: string): void {
  const size = statSync(file).size;
  const pad = (4096 - ((size + 1) % 4096)) % 4096;
  appendFileSync(file, `${'#'.repeat(pad)}\n`);
}

beforeAll(async () => {
  guest = await ensureTinyGuest();
  relay = await startRelay({ port: RELAY_PORT });
  root = mountTmpfs(4096);
  state = mountTmpfs(8192);
  // Room for one 1 GiB overlay's promise, not two (tmpfs takes pages only as they are written).
  vms = mountTmpfs(1536 * 1024);
  mkdirSync(join(vms.dir, 'vms'), { mode: 0o700 });
  agent = await start();
  consumer = new ConsumerClient({ sk: generateSecretKey(), provider: agent.pubkey, relays: [relay.url] });
  await consumer.start();
  consumer.onReply((r) => replies.push(r));
});

afterAll(async () => {
  await consumer?.close();
  await agent?.stop();
  for (const pid of qemuPidsMatching(vms.dir)) process.kill(pid, 'SIGKILL');
  for (const fs of [root, state, vms]) fs?.unmount();
  await relay?.stop();
});

describe('full disks', () => {
  let first: string;

  it('a VM root without room for another diskGb answers capacity_exhausted and makes nothing', async () => {
    const ok = await consumer.request({ type: 'spawn', root_password: 'a-long-test-password-1' }, { timeoutMs: 60_000 });
    expect(ok).toMatchObject({ type: 'access_details' });
    first = ok.workload_id as string;
    const refused = await consumer.request({ type: 'spawn', root_password: 'a-long-test-password-1' }, { timeoutMs: 60_000 });
    expect(refused).toMatchObject({ type: 'error', code: 'capacity_exhausted' });
    expect(readdirSync(join(vms.dir, 'vms'))).toEqual([first]);
    expect(readdirSync(join(state.dir, 'inflight'))).toEqual([]);
    expect(readdirSync(join(state.dir, 'leases'))).toEqual([`${first}.json`]);
  });

  it('a full state dir: requests are held, the lease still expires, a restart works, and space back answers each request exactly once', async () => {
    // tmpfs hands out whole pages: fill the log's last one too (a foreign line
    // the store skips when it reads), so the next claim needs a page that is not there.
    padToPage(join(state.dir, 'seen.log'));
    state.fill();
    const spawn = await consumer.send({ type: 'spawn', root_password: 'a-long-test-password-2' });
    const status = await consumer.send({ type: 'status', workload_id: first });
    await agent!.waitForLog(/request held/, 20_000);
    await sleep(3000);
    expect(repliesTo(spawn)).toEqual([]);
    expect(repliesTo(status)).toEqual([]);

    // The agent restarts on the full disk (systemd would restart it): it must start, not exit.
    await agent!.stop();
    agent = await start();
    await agent.waitForLog(/request held/, 30_000);

    // Leases end while the disk is full.
    await until(() => replies.some((r) => r.type === 'expired' && r.workload_id === first), (LEASE_SECONDS + 30) * 1000, 'lease expired while full');
    expect(existsSync(join(vms.dir, 'vms', first))).toBe(false);
    expect(repliesTo(spawn)).toEqual([]);

    state.free();
    await until(() => repliesTo(spawn).length > 0 && repliesTo(status).length > 0, 60_000, 'held requests answered');
    expect(repliesTo(spawn)).toEqual([expect.objectContaining({ type: 'access_details' })]);
    // The lease it asked about has expired: not_found, once.
    expect(repliesTo(status)).toEqual([expect.objectContaining({ type: 'error', code: 'not_found' })]);

    // Once more after another restart: claims written after the space came back hold.
    await agent.stop();
    agent = await start();
    await sleep(5000);
    expect(repliesTo(spawn).filter((r) => r.type === 'access_details')).toHaveLength(1);
    expect(repliesTo(status)).toHaveLength(1);
  });
});

describe('doctor on full disks', () => {
  it('a state dir that takes no new file is a warning (the agent must start), and plans that do not fit are named', async () => {
    // No inode left: even mkdir fails with ENOSPC, as on a full ext4.
    const fs = mountTmpfs(1024, { inodes: 8 });
    try {
      for (let i = 0; ; i++) {
        try {
          writeFileSync(join(fs.dir, `f${i}`), '');
        } catch {
          break;
        }
      }
      const row = await checkWritableDir('state dir', 'stateDir', fs.dir);
      expect(row).toMatchObject({ status: 'warn' });
      expect(row.detail).toContain('ENOSPC');
      const disk = await checkDiskSpace(fs.dir, 0, [{ id: 'tiny', diskGb: 1 }]);
      expect(disk).toMatchObject({ status: 'warn' });
      expect(disk.detail).toContain('tiny (1 GB)');
      expect(disk.detail).toContain('limits.diskReserveGb');
    } finally {
      fs.unmount();
    }
  });
});
