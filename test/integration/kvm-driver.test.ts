/**
 * The KVM driver against real qemu-img, genisoimage and qemu-system-x86_64
 * (TCG), booting the tiny busybox guest. The VM root has a comma in its path
 * so every qemu option string is exercised with an escaped path.
 */
import { connect, createServer, type Server } from 'node:net';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DriverError, type WorkloadSpec } from '../../src/drivers/types.js';
import { KvmDriver, type KvmDriverConfig } from '../../src/drivers/kvm/index.js';
import { findPasstPids } from '../../src/drivers/kvm/passt.js';
import { silentLogger } from '../../src/util/logger.js';
import { isFree, isListening, processRuns, qemuPidsMatching, until } from '../support/net.js';
import { cloudInitFinished, ensureCloudGuest } from '../support/cloud-guest.js';
import { ensureTinyGuest, tinyDriverConfig, TINY_GUEST_BANNER, TINY_GUEST_MARKER, type TinyGuest } from '../support/tiny-guest.js';
import { filesUnder } from '../support/files.js';

const PASSWORD = 'Sup3r-Secret-Pl@intext-Passw0rd';
let guest: TinyGuest;
let root: string;
const drivers: KvmDriver[] = [];

function config(over: Partial<KvmDriverConfig> = {}): KvmDriverConfig {
  return tinyDriverConfig(guest, {
    vmRoot: join(root, 'vms'),
    portRange: { from: 42000, to: 42019 },
    namePrefix: 'paygress-kvmtest-',
    ...over,
  });
}

function driver(over: Partial<KvmDriverConfig> = {}, logger = silentLogger): KvmDriver {
  const d = new KvmDriver(config(over), logger);
  drivers.push(d);
  return d;
}

function spec(id: string, over: Partial<WorkloadSpec> = {}): WorkloadSpec {
  return {
    id,
    hostname: `host-${id}`,
    vcpus: 1,
    memoryMb: 256,
    diskGb: 2,
    rootPassword: PASSWORD,
    sshKeys: ['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB3Zk6Ue1hXv5vJXxvO4O0L0x0E0bq5D3dQn3yV6m6m1 test@host'],
    ...over,
  };
}

/** First line the guest sends through the forwarded port, or '' if none (qemu closes when the guest is not listening yet). */
function readLine(port: number): Promise<string> {
  return new Promise((resolve) => {
    const s = connect({ host: '127.0.0.1', port });
    let buf = '';
    const done = () => {
      s.destroy();
      resolve(buf);
    };
    s.setTimeout(3_000, done);
    s.on('data', (d) => {
      buf += d.toString('latin1');
      if (buf.includes('\n')) done();
    });
    s.on('end', done);
    s.on('error', done);
  });
}

function listen(port: number): Promise<Server> {
  return new Promise((resolve, reject) => {
    const srv = createServer((c) => c.destroy());
    srv.once('error', reject);
    srv.listen(port, '127.0.0.1', () => resolve(srv));
  });
}

beforeAll(async () => {
  guest = await ensureTinyGuest();
  root = mkdtempSync(join(tmpdir(), 'paygress-kvm,test-'));
});

afterAll(async () => {
  for (const d of drivers) {
    for (const id of await d.list().catch(() => [])) await d.destroy(id).catch(() => undefined);
  }
  for (const pid of qemuPidsMatching('paygress-kvmtest-')) process.kill(pid, 'SIGKILL');
  if (root) rmSync(root, { recursive: true, force: true });
});

describe('KvmDriver with real qemu (TCG) and the tiny guest', () => {
  it('creates a VM that boots and is reachable, keeps no plaintext, and destroys it completely', async () => {
    const logLines: string[] = [];
    const d = driver({}, pino({ level: 'debug' }, { write: (line: string) => void logLines.push(line) }));
    const h = await d.create(spec('vm1'));
    const name = 'paygress-kvmtest-vm1';

    expect(h.dir).toBe(join(config().vmRoot, 'vm1'));
    expect(statSync(h.dir).mode & 0o777).toBe(0o700);
    expect(statSync(join(h.dir, 'seed.iso')).mode & 0o777).toBe(0o600);
    expect(statSync(join(h.dir, 'vm.json')).mode & 0o777).toBe(0o600);
    expect(Number(readFileSync(join(h.dir, 'qemu.pid'), 'utf8').trim())).toBe(h.pid);
    expect(processRuns(h.pid, name)).toBe(true);
    expect(h.sshPort).toBeGreaterThanOrEqual(42000);
    expect(h.sshPort).toBeLessThanOrEqual(42019);
    expect(await isListening(h.sshPort)).toBe(true);

    // The overlay backs onto the base by absolute path (-U: qemu holds the image lock).
    const info = JSON.parse((await execa('qemu-img', ['info', '-U', '--output=json', join(h.dir, 'disk.qcow2')])).stdout);
    expect(info['backing-filename']).toBe(guest.baseImage);
    expect(info['backing-filename-format']).toBe('qcow2');
    expect(info['virtual-size']).toBe(2 * 1024 ** 3);

    expect(await d.inspect('vm1')).toEqual({ id: 'vm1', state: 'running', pid: h.pid, sshPort: h.sshPort });
    expect(await d.list()).toEqual(['vm1']);
    expect(JSON.parse(readFileSync(join(h.dir, 'vm.json'), 'utf8'))).toMatchObject({ id: 'vm1', name, sshPort: h.sshPort });

    // The guest booted: its fake sshd answers through the hostfwd port.
    let banner = '';
    await until(async () => (banner = await readLine(h.sshPort)).startsWith('SSH-2.0-'), 60_000, 'SSH banner');
    expect(banner).toBe(`${TINY_GUEST_BANNER}\n`);
    await until(async () => (await d.readConsole('vm1')).includes(TINY_GUEST_MARKER), 30_000, 'guest marker on the console');
    expect(readFileSync(join(h.dir, 'serial.log'), 'utf8')).toContain(TINY_GUEST_MARKER);

    // No file the workload owns holds the plaintext; the seed carries the hash instead.
    const files = filesUnder(h.dir);
    expect(files.map((f) => f.slice(h.dir.length + 1)).sort()).toEqual(['disk.qcow2', 'qemu.pid', 'seed.iso', 'serial.log', 'vm.json']);
    for (const f of files) {
      const bytes = readFileSync(f);
      expect(bytes.includes(Buffer.from(PASSWORD, 'utf8')), f).toBe(false);
      expect(bytes.includes(Buffer.from(PASSWORD, 'utf16le')), f).toBe(false);
    }
    const seed = readFileSync(join(h.dir, 'seed.iso'));
    expect(seed.includes(Buffer.from('#cloud-config'))).toBe(true);
    expect(seed.includes(Buffer.from('password: $6$'))).toBe(true);

    await d.destroy('vm1');
    expect(processRuns(h.pid)).toBe(false);
    expect(() => statSync(h.dir)).toThrow();
    expect(await isFree(h.sshPort)).toBe(true);
    expect(await d.inspect('vm1')).toEqual({ id: 'vm1', state: 'gone' });
    expect(await d.list()).toEqual([]);
    // Idempotent.
    await d.destroy('vm1');

    // Phases were logged with timings, and the password never was.
    const phases = logLines.map((l) => JSON.parse(l) as { phase?: string; ms?: number; msg?: string }).filter((l) => l.phase);
    // The seed is written beside overlay → qemu → pidfile; QMP attaches it and starts the VM last.
    const order = phases.map((l) => l.phase);
    expect([...order].sort()).toEqual(['destroy', 'overlay', 'pidfile', 'qemu', 'seed', 'start']);
    expect(order.filter((p) => p !== 'seed')).toEqual(['overlay', 'qemu', 'pidfile', 'start', 'destroy']);
    expect(order.indexOf('seed')).toBeLessThan(order.indexOf('start'));
    for (const l of phases) expect(typeof l.ms).toBe('number');
    expect(logLines.join('\n')).not.toContain(PASSWORD);
  });

  it('attaches the seed before the guest runs: the guest kernel finds it at boot as its second disk', async () => {
    // loglevel=6: the kernel prints each virtio disk it finds.
    const d = driver({ append: 'console=ttyS0 loglevel=6' });
    const h = await d.create(spec('seedboot'));
    const seedSectors = statSync(join(h.dir, 'seed.iso')).size / 512;
    let log = '';
    await until(async () => (log = await d.readConsole('seedboot')).includes(TINY_GUEST_MARKER), 60_000, 'guest up');
    expect(log).toMatch(/\[vda\] 4194304 512-byte logical blocks/);
    expect(log).toContain(`[vdb] ${seedSectors} 512-byte logical blocks`);
    // QMP answered and was hung up on; the socket stays for the next time the agent needs it.
    expect(statSync(join(h.dir, 'qmp.sock')).isSocket()).toBe(true);
    await d.destroy('seedboot');
  });

  it('stops the paused qemu and frees everything when the seed cannot be written', async () => {
    const d = driver({ portRange: { from: 42032, to: 42032 }, isoTool: join(root, 'no-such-genisoimage') });
    for (let i = 0; i < 2; i++) {
      const err = await d.create(spec('noseed')).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(DriverError);
      expect((err as DriverError).message).toMatch(/seed ISO creation failed/);
      expect(readdirSync(config().vmRoot)).not.toContain('noseed');
      expect(qemuPidsMatching('paygress-kvmtest-noseed')).toEqual([]);
      expect(await isFree(42032)).toBe(true);
    }
  });

  it('refuses a vmRoot so long that a workload socket (qmp.sock, passt.sock) would not fit in sun_path', () => {
    // '/' + 40-character id + '/passt.sock' adds 52 bytes: 55 is the longest vmRoot that fits.
    const rootOf = (len: number) => `/${'v'.repeat(len - 1)}`;
    expect(() => new KvmDriver(config({ vmRoot: rootOf(55) }), silentLogger)).not.toThrow();
    expect(() => new KvmDriver(config({ vmRoot: rootOf(56) }), silentLogger)).toThrow(/at most 55 bytes/);
  });

  it('gives concurrent creates different ports', async () => {
    const d = driver();
    const [a, b] = await Promise.all([d.create(spec('cc-a')), d.create(spec('cc-b'))]);
    expect(a.sshPort).not.toBe(b.sshPort);
    expect(processRuns(a.pid, 'paygress-kvmtest-cc-a')).toBe(true);
    expect(processRuns(b.pid, 'paygress-kvmtest-cc-b')).toBe(true);
    expect(await d.list()).toEqual(['cc-a', 'cc-b']);
    await Promise.all([d.destroy('cc-a'), d.destroy('cc-b')]);
    expect(processRuns(a.pid)).toBe(false);
    expect(processRuns(b.pid)).toBe(false);
    expect(await d.list()).toEqual([]);
  });

  it('releases directory and port when qemu fails after the port was taken', async () => {
    // One port only: if a failed create leaked it, the second try would fail with `capacity`.
    const d = driver({ portRange: { from: 42030, to: 42030 }, kernel: join(root, 'no-such-kernel') });
    for (let i = 0; i < 2; i++) {
      const err = await d.create(spec('badkernel')).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(DriverError);
      expect((err as DriverError).code).toBe('launch_failed');
      expect((err as DriverError).detail).toMatch(/could not open kernel file/i);
      expect((err as DriverError).detail).not.toContain(PASSWORD);
      expect(readdirSync(config().vmRoot)).not.toContain('badkernel');
      expect(await isFree(42030)).toBe(true);
    }
    expect(qemuPidsMatching('paygress-kvmtest-badkernel')).toEqual([]);
  });

  it('stops passt and frees port and directory when qemu cannot start after passt took the port', async () => {
    // No qemu ever connects to this passt, so --one-off would never end it: only the driver's cleanup does.
    const d = driver({ network: 'passt', portRange: { from: 47700, to: 47700 }, qemuBinary: join(root, 'no-such-qemu') });
    const socket = join(config().vmRoot, 'passtfail', 'passt.sock');
    for (let i = 0; i < 2; i++) {
      const err = await d.create(spec('passtfail')).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(DriverError);
      expect((err as DriverError).message).toMatch(/qemu could not be started/);
      expect(readdirSync(config().vmRoot)).not.toContain('passtfail');
      expect(await findPasstPids(socket)).toEqual([]);
      expect(await isFree(47700)).toBe(true);
    }
  });

  it('releases everything when the base image does not exist', async () => {
    const d = driver({ portRange: { from: 42031, to: 42031 }, baseImage: join(root, 'missing.qcow2') });
    const err = await d.create(spec('nobase')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DriverError);
    expect(readdirSync(config().vmRoot)).not.toContain('nobase');
    expect(await isFree(42031)).toBe(true);
    expect(await d.list()).toEqual([]);
  });

  it('skips a port someone else holds, and reports capacity when none is left', async () => {
    const squatter = await listen(42040);
    try {
      const full = driver({ portRange: { from: 42040, to: 42040 } });
      const err = await full.create(spec('full')).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(DriverError);
      expect((err as DriverError).code).toBe('capacity');
      expect(readdirSync(config().vmRoot)).not.toContain('full');

      const d = driver({ portRange: { from: 42040, to: 42041 } });
      const h = await d.create(spec('skip'));
      expect(h.sshPort).toBe(42041);
      await d.destroy('skip');
      expect(await isFree(42041)).toBe(true);
    } finally {
      await new Promise((r) => squatter.close(r));
    }
  });

  it('refuses to create over an existing workload and leaves it alone', async () => {
    const d = driver();
    const h = await d.create(spec('dup'));
    const err = await d.create(spec('dup')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DriverError);
    expect(processRuns(h.pid, 'paygress-kvmtest-dup')).toBe(true);
    expect(statSync(join(h.dir, 'vm.json')).isFile()).toBe(true);
    await d.destroy('dup');
    expect(processRuns(h.pid)).toBe(false);
  });

  it('destroy does not signal a process that merely reuses the pid in the pidfile', async () => {
    const d = driver();
    const h = await d.create(spec('reuse'));
    // Stand-in for a recycled pid: another live process's pid written into the pidfile.
    const other = execa('sleep', ['60']);
    try {
      writeFileSync(join(h.dir, 'qemu.pid'), `${other.pid}\n`);
      await d.destroy('reuse');
      // The stranger lives; qemu is still found by its name and stopped.
      expect(processRuns(other.pid!, 'sleep')).toBe(true);
      expect(processRuns(h.pid)).toBe(false);
      expect(await d.list()).toEqual([]);
    } finally {
      other.kill('SIGKILL');
      await other.catch(() => undefined);
    }
  });
});

// The seed's real test: cloud-init 22.4 in a Debian guest must let root in with
// the password and with the key (the end-to-end test covers the password
// only). 70-160 s under TCG on 2 cores; the guest is built by the global setup.
describe('KvmDriver seed with real cloud-init (Debian cloud guest)', () => {
  it('root logs in with the password and with the key once cloud-init reports done', { timeout: 300_000 }, async () => {
    const cloud = await ensureCloudGuest();
    const keyDir = mkdtempSync(join(root, 'key-'));
    await execa('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(keyDir, 'id')]);
    const pub = readFileSync(join(keyDir, 'id.pub'), 'utf8').trim();
    const d = driver({
      baseImage: cloud.baseImage, kernel: cloud.kernel, initrd: cloud.initrd, append: cloud.append,
      portRange: { from: 42050, to: 42059 },
    });
    // Characters that broke the upstream's string-pasted YAML.
    const password = `p4ss: "q" #x 'ünï' - [y]`;
    const h = await d.create(spec('cloud1', { hostname: 'cloudy-one', vcpus: 2, memoryMb: 1024, diskGb: 4, rootPassword: password, sshKeys: [pub] }));
    try {
      await until(() => cloudInitFinished(d, 'cloud1'), 240_000, 'cloud-init final message on the serial console');
      const ssh = ['-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR',
        '-o', 'ConnectTimeout=20', '-p', String(h.sshPort)];
      // Password on sshpass's environment, never argv.
      const byPassword = await execa('sshpass', ['-e', 'ssh', ...ssh, '-o', 'PubkeyAuthentication=no',
        '-o', 'PreferredAuthentications=password', 'root@127.0.0.1', 'hostname; id -un'], { env: { SSHPASS: password }, reject: false });
      expect(byPassword.exitCode, byPassword.stderr).toBe(0);
      expect(byPassword.stdout.split('\n')).toEqual(['cloudy-one', 'root']);
      const wrong = await execa('sshpass', ['-e', 'ssh', ...ssh, '-o', 'PubkeyAuthentication=no', 'root@127.0.0.1', 'true'],
        { env: { SSHPASS: `${password}x` }, reject: false });
      expect(wrong.exitCode).not.toBe(0);
      const byKey = await execa('ssh', [...ssh, '-i', join(keyDir, 'id'), '-o', 'BatchMode=yes', '-o', 'PasswordAuthentication=no',
        'root@127.0.0.1', 'id -un; getent passwd debian || echo no-default-user'], { reject: false });
      expect(byKey.exitCode, byKey.stderr).toBe(0);
      expect(byKey.stdout.split('\n')).toEqual(['root', 'no-default-user']);
      expect(readFileSync(join(h.dir, 'serial.log'), 'utf8')).not.toContain(password);
    } finally {
      await d.destroy('cloud1');
    }
    expect(processRuns(h.pid)).toBe(false);
  });
});
