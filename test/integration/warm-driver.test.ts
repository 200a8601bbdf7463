/**
 * The KVM driver's warm-pool side against real qemu: an idle cloud-init guest
 * (with qemu-guest-agent) that nobody can log in to, handed to a tenant
 * through its guest agent, after which the tenant's password and key work
 * and the channel is gone. Lying and hanging guest agents are played by a
 * fake speaking qemu-ga's protocol on the VM's own qga.sock (tiny guest).
 */
import { connect } from 'node:net';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DriverError, type TenantSpec } from '../../src/drivers/types.js';
import { KvmDriver, type KvmDriverConfig } from '../../src/drivers/kvm/index.js';
import { SSHD_DROPIN_CONTENT, SSHD_DROPIN_PATH } from '../../src/drivers/kvm/cloud-config.js';
import { runQmp } from '../../src/drivers/kvm/qmp.js';
import { silentLogger } from '../../src/util/logger.js';
import { qemuPidsMatching, until } from '../support/net.js';
import { ensureCloudGuest } from '../support/cloud-guest.js';
import { ensureTinyGuest, tinyDriverConfig, type TinyGuest } from '../support/tiny-guest.js';
import { startFakeQga, type FakeQgaBehaviour } from '../support/fake-qga.js';
import { filesUnder } from '../support/files.js';

const PASSWORD = `t3nant: "pw" #x 'ünï'`;
/** What an honest idle guest's agent would show: a locked root, the seed's sshd drop-in, sshd listening. */
const PROC_NET_TCP = [
  '  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode',
  '   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 13007 1 0000000000000000 100 0 0 10 0',
  '',
].join('\n');
const GUEST_FILES = {
  '/etc/shadow': 'root:!*:19000:0:99999:7:::\nsshd:!:19000::::::\n',
  [SSHD_DROPIN_PATH]: SSHD_DROPIN_CONTENT,
  '/proc/net/tcp': PROC_NET_TCP,
};
let root: string;
let tiny: TinyGuest;
const drivers: KvmDriver[] = [];

beforeAll(async () => {
  root = mkdtempSync(join(tmpdir(), 'pga-warm-'));
  tiny = await ensureTinyGuest();
});

afterAll(async () => {
  for (const d of drivers) d.close();
  for (const pid of qemuPidsMatching(root)) process.kill(pid, 'SIGKILL');
  rmSync(root, { recursive: true, force: true });
});

function driver(over: Partial<KvmDriverConfig> & Pick<KvmDriverConfig, 'portRange'>): KvmDriver {
  const d = new KvmDriver(
    tinyDriverConfig(tiny, { vmRoot: join(root, 'vms'), namePrefix: 'paygress-warmtest-', ...over }),
    silentLogger,
  );
  drivers.push(d);
  return d;
}

function ssh(port: number, args: string[], env: Record<string, string> = {}) {
  return execa(
    env.SSHPASS !== undefined ? 'sshpass' : 'ssh',
    [
      ...(env.SSHPASS !== undefined ? ['-e', 'ssh'] : []),
      '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR',
      '-o', 'ConnectTimeout=20', '-p', String(port), ...args,
    ],
    // The password travels in sshpass's environment, never argv.
    { env, reject: false, timeout: 60_000, stdin: 'ignore' },
  );
}
const byPassword = (port: number, password: string, cmd: string) =>
  ssh(port, ['-o', 'PubkeyAuthentication=no', '-o', 'PreferredAuthentications=password', 'root@127.0.0.1', cmd], { SSHPASS: password });
const byKey = (port: number, key: string, cmd: string) =>
  ssh(port, ['-i', key, '-o', 'BatchMode=yes', '-o', 'PasswordAuthentication=no', '-o', 'IdentitiesOnly=yes', 'root@127.0.0.1', cmd]);

function connects(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ path });
    s.on('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}

async function chardevLabels(dir: string): Promise<string[]> {
  const [ret] = await runQmp(join(dir, 'qmp.sock'), [{ execute: 'query-chardev' }], 5_000);
  return (ret as { label: string }[]).map((c) => c.label);
}

describe('warm pool with a real cloud-init guest', () => {
  it('idle VM: nobody can log in; hand-off: the tenant password and key work, hostname set, channel gone, never twice', async () => {
    const cloud = await ensureCloudGuest();
    const d = driver({
      baseImage: cloud.baseImage, kernel: cloud.kernel, initrd: cloud.initrd, append: cloud.append,
      readiness: 'cloud-init', portRange: { from: 47500, to: 47509 },
    });
    const keyDir = mkdtempSync(join(root, 'key-'));
    await execa('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(keyDir, 'id')]);
    const pub = readFileSync(join(keyDir, 'id.pub'), 'utf8').trim();
    const key = join(keyDir, 'id');

    const h = await d.warm.createIdle({ id: 'warm1', vcpus: 2, memoryMb: 1024, diskGb: 4 });
    try {
      expect((await d.readMeta('warm1'))?.warm).toBe('idle');
      expect(existsSync(join(h.dir, 'qga.sock'))).toBe(true);
      const idle = await d.warm.waitIdle('warm1', { timeoutMs: 400_000 });
      expect(idle, JSON.stringify(idle)).toMatchObject({ ready: true });

      // Idle: root locked, no keys. The password "that could be anything" and the tenant's key are both refused.
      for (const guess of ['', 'root', PASSWORD]) expect((await byPassword(h.sshPort, guess, 'true')).exitCode).not.toBe(0);
      expect((await byKey(h.sshPort, key, 'true')).exitCode).not.toBe(0);

      const tenant: TenantSpec = { hostname: 'tenant-one', rootPassword: PASSWORD, sshKeys: [pub] };
      const t = performance.now();
      await d.warm.handOff('warm1', tenant, { timeoutMs: 30_000 });
      const handOffMs = Math.round(performance.now() - t);
      console.log(`hand-off took ${handOffMs} ms`);

      // Right away: the tenant's password and key open root, the hostname is theirs (running and on disk).
      const pw = await byPassword(h.sshPort, PASSWORD, 'hostname; id -un; cat /etc/hostname');
      expect(pw.exitCode, pw.stderr).toBe(0);
      expect(pw.stdout.split('\n')).toEqual(['tenant-one', 'root', 'tenant-one']);
      expect((await byPassword(h.sshPort, `${PASSWORD}x`, 'true')).exitCode).not.toBe(0);
      // The guest agent's port is gone from the guest too, and its unit stopped with it.
      const k = await byKey(h.sshPort, key, 'id -un; ls /dev/virtio-ports/ 2>/dev/null | wc -l; systemctl is-active qemu-guest-agent || true');
      expect(k.exitCode, k.stderr).toBe(0);
      expect(k.stdout.split('\n')).toEqual(['root', '0', 'inactive']);

      // The channel is gone for good: no socket, no chardev in qemu (removed just after the hand-off resolves), and a second hand-off is refused.
      expect(existsSync(join(h.dir, 'qga.sock'))).toBe(false);
      expect(await connects(join(h.dir, 'qga.sock'))).toBe(false);
      await until(async () => !(await chardevLabels(h.dir)).includes('qga0'), 10_000, 'qemu drops the guest-agent chardev');
      expect((await d.readMeta('warm1'))?.warm).toBe('handed-off');
      const again = await d.warm.handOff('warm1', { ...tenant, hostname: 'tenant-two' }, { timeoutMs: 10_000 }).catch((e: unknown) => e);
      expect(again).toBeInstanceOf(DriverError);
      expect((again as DriverError).code).toBe('handoff_failed');
      expect((await byPassword(h.sshPort, PASSWORD, 'hostname')).stdout.trim()).toBe('tenant-one');

      // The plaintext password reached no file on the host.
      const needle = Buffer.from(PASSWORD, 'utf8');
      expect(filesUnder(join(root, 'vms')).filter((f) => readFileSync(f).includes(needle))).toEqual([]);
    } finally {
      await d.destroy('warm1');
    }
    expect(existsSync(h.dir)).toBe(false);
  }, 600_000);
});

describe('warm pool against a hostile guest agent', () => {
  // Each case: an idle tiny guest whose qga.sock is replaced by a fake qemu-ga
  // that lies or hangs the way a guest in control of its agent could.
  const cases: [FakeQgaBehaviour, RegExp][] = [
    ['wrong-sync-id', /sync/],
    ['malformed', /not JSON/],
    ['error-answer', /guest-file-open: GenericError: open failed/],
    ['oversized', /oversized/],
    ['hang', /no answer|deadline/],
    ['wrong-dropin', /sshd_config/],
    ['sshd-down', /nothing listens on port 22/],
  ];
  it.each(cases)('%s → handoff_failed, and the VM is never handed off again', async (behaviour, message) => {
    const d = driver({ portRange: { from: 47510, to: 47529 } });
    const id = `liar-${behaviour}`;
    const h = await d.warm.createIdle({ id, vcpus: 1, memoryMb: 256, diskGb: 1 });
    try {
      expect(existsSync(join(h.dir, 'qga.sock'))).toBe(true);
      const fake = await startFakeQga(join(h.dir, 'qga.sock'), behaviour, GUEST_FILES);
      try {
        const err = await d.warm.handOff(id, { hostname: 'victim', rootPassword: PASSWORD, sshKeys: [] }, { timeoutMs: 3_000 }).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(DriverError);
        expect((err as DriverError).code).toBe('handoff_failed');
        expect((err as DriverError).message).toMatch(message);
        // Guest text reaches the message only bounded and printable.
        expect((err as DriverError).message.length).toBeLessThan(300);
        expect((err as DriverError).message).not.toMatch(/[\x00-\x1f\x7f]/);
        expect(fake.received[0]).toBe('guest-sync-delimited');
      } finally {
        await fake.close();
      }
      // The socket the fake held is removed, the chardev too; a retry is refused before any byte is sent.
      expect(existsSync(join(h.dir, 'qga.sock'))).toBe(false);
      expect(await chardevLabels(h.dir)).not.toContain('qga0');
      const again = await d.warm.handOff(id, { hostname: 'victim', rootPassword: PASSWORD, sshKeys: [] }, { timeoutMs: 3_000 }).catch((e: unknown) => e);
      expect((again as DriverError).code).toBe('handoff_failed');
      expect((again as DriverError).message).toMatch(/handed off before/);
    } finally {
      await d.destroy(id);
    }
  }, 120_000);

  it('an honest agent gets the whole hand-off sequence, in order', async () => {
    const d = driver({ portRange: { from: 47530, to: 47539 } });
    const h = await d.warm.createIdle({ id: 'honest', vcpus: 1, memoryMb: 256, diskGb: 1 });
    try {
      const fake = await startFakeQga(join(h.dir, 'qga.sock'), 'honest', GUEST_FILES);
      try {
        await d.warm.handOff('honest', { hostname: 'tenant', rootPassword: PASSWORD, sshKeys: [] }, { timeoutMs: 10_000 });
        expect(fake.received).toEqual([
          'guest-sync-delimited',
          // shadow, sshd drop-in, /proc/net/tcp to read; /etc/hostname, the running hostname to write; keys replaced
          ...Array(5).fill('guest-file-open'), 'guest-ssh-add-authorized-keys',
          ...Array(3).fill('guest-file-read'), ...Array(2).fill('guest-file-write'), ...Array(5).fill('guest-file-close'),
          // /etc/shadow written back with root's hash
          'guest-file-open', 'guest-file-write', 'guest-file-close',
        ]);
        const shadow = fake.written.get('/etc/shadow')!.toString();
        expect(shadow).toMatch(/^root:\$6\$[^:]+:\d+:0:99999:7:::\nsshd:!:19000::::::\n$/);
        expect(shadow).not.toContain(PASSWORD);
        expect(fake.written.get('/etc/hostname')!.toString()).toBe('tenant\n');
        expect(fake.written.get('/proc/sys/kernel/hostname')!.toString()).toBe('tenant');
      } finally {
        await fake.close();
      }
    } finally {
      await d.destroy('honest');
    }
  }, 180_000);

  it('a hostname or key that tries injection is refused before the guest hears anything, and the VM stays idle', async () => {
    const d = driver({ portRange: { from: 47550, to: 47559 } });
    const h = await d.warm.createIdle({ id: 'inject', vcpus: 1, memoryMb: 256, diskGb: 1 });
    try {
      const fake = await startFakeQga(join(h.dir, 'qga.sock'), 'honest', GUEST_FILES);
      try {
        const bad: [Partial<TenantSpec>, RegExp][] = [
          [{ hostname: 'x\nroot::0:0:99999:7:::' }, /hostname/],
          [{ sshKeys: ['ssh-ed25519 AAAA k\ncommand="sh" ssh-ed25519 AAAA evil'] }, /key/],
        ];
        for (const [over, message] of bad) {
          const err = await d.warm
            .handOff('inject', { hostname: 'ok', rootPassword: PASSWORD, sshKeys: [], ...over }, { timeoutMs: 3_000 })
            .catch((e: unknown) => e);
          expect((err as DriverError).code).toBe('handoff_failed');
          expect((err as DriverError).message).toMatch(message);
        }
        expect(fake.received).toEqual([]);
        // A caller's bad value does not use the VM up.
        expect((await d.readMeta('inject'))?.warm).toBe('idle');
      } finally {
        await fake.close();
      }
    } finally {
      await d.destroy('inject');
    }
  }, 60_000);

  it('a cold VM has no guest-agent channel, and cannot be handed off', async () => {
    const d = driver({ portRange: { from: 47540, to: 47549 } });
    const h = await d.create({ id: 'cold', hostname: 'cold', vcpus: 1, memoryMb: 256, diskGb: 1, rootPassword: PASSWORD, sshKeys: [] });
    try {
      expect(existsSync(join(h.dir, 'qga.sock'))).toBe(false);
      expect(await chardevLabels(h.dir)).not.toContain('qga0');
      expect(readFileSync(`/proc/${h.pid}/cmdline`, 'utf8')).not.toContain('guest_agent');
      const err = await d.warm.handOff('cold', { hostname: 'x', rootPassword: PASSWORD, sshKeys: [] }, { timeoutMs: 3_000 }).catch((e: unknown) => e);
      expect((err as DriverError).code).toBe('handoff_failed');
    } finally {
      await d.destroy('cold');
    }
  }, 60_000);
});
