/**
 * `paygress-agent doctor`: each check against the real thing, once passing
 * and once failing; then the CLI (doctor's table and exit code, `run`
 * refusing to start on a blocker), and the request-scoped log fields of a
 * real spawn. Ports: 45200-45299.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { generateSecretKey } from 'nostr-tools';
import { nsecEncode } from 'nostr-tools/nip19';
import { ConsumerClient } from '../../src/client/consumer.js';
import { checkAccel, checkBaseImage, checkKeyFile, checkPorts, checkPublicHost, checkRelays, checkTools, checkWritableDir } from '../../src/doctor/checks.js';
import { renderTable } from '../../src/doctor/report.js';
import { startAgentProcess, type AgentProcess } from '../support/agent-process.js';
import { startRelay, type LocalRelay } from '../support/relay.js';
import { ensureTinyGuest, type TinyGuest } from '../support/tiny-guest.js';

const AGENT_CLI = new URL('../../src/cli/agent.ts', import.meta.url).pathname;
const QEMU = 'qemu-system-x86_64';
const RELAY_PORT = 45280;
const DEAD_RELAY = 'ws://127.0.0.1:45281';

let dir: string;
let relay: LocalRelay;
let guest: TinyGuest;
const servers: net.Server[] = [];
const sockets = new Set<net.Socket>();

function listen(port: number): Promise<net.Server> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer((sock) => {
      sockets.add(sock);
      sock.on('close', () => sockets.delete(sock));
    });
    srv.once('error', reject);
    srv.listen({ host: '127.0.0.1', port, exclusive: true }, () => {
      servers.push(srv);
      resolve(srv);
    });
  });
}

function keyFile(mode: number): string {
  const file = join(dir, `key-${mode.toString(8)}-${Math.random().toString(36).slice(2)}.nsec`);
  writeFileSync(file, `${nsecEncode(generateSecretKey())}\n`, { mode });
  chmodSync(file, mode);
  return file;
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'pga-doctor-'));
  relay = await startRelay({ port: RELAY_PORT });
  guest = await ensureTinyGuest();
});

afterAll(async () => {
  for (const sock of sockets) sock.destroy();
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  await relay?.stop();
  rmSync(dir, { recursive: true, force: true });
});

describe('accel', () => {
  it('passes: accel tcg boots the test guest', async () => {
    const r = await checkAccel({ accel: 'tcg', qemuBinary: QEMU }, { device: join(dir, 'no-kvm') });
    expect(r.status).toBe('ok');
    expect(r.detail).toMatch(/tcg as configured \(test guest booted in \d+ ms\)/);
  });

  it('fails: accel kvm without a usable device, with the tcg fix', async () => {
    const r = await checkAccel({ accel: 'kvm', qemuBinary: QEMU }, { device: join(dir, 'no-kvm') });
    expect(r.status).toBe('fail');
    expect(r.fix).toMatch(/set drivers\.kvm\.accel to "tcg"/);
  });

  it.skipIf(!existsSync('/dev/kvm'))('fails: accel kvm on this host, whose /dev/kvm opens but hangs guests', async () => {
    const r = await checkAccel({ accel: 'kvm', qemuBinary: QEMU }, { timeoutMs: 3_000 });
    expect(r.status).toBe('fail');
    expect(r.detail).toMatch(/cannot run a guest: a test guest hung \(never reached protected mode\)/);
    expect(r.fix).toMatch(/set drivers\.kvm\.accel to "tcg"/);
  });

  it('fails when qemu cannot run a guest at all', async () => {
    const r = await checkAccel({ accel: 'tcg', qemuBinary: join(dir, 'no-qemu') }, { device: join(dir, 'no-kvm') });
    expect(r.status).toBe('fail');
    expect(r.detail).toMatch(/no-qemu not found/);
  });
});

describe('tools', () => {
  it('passes with the installed qemu, qemu-img and genisoimage, showing versions', async () => {
    const rows = await checkTools({ qemuBinary: QEMU, qemuImgBinary: 'qemu-img', isoTool: 'genisoimage' });
    expect(rows.map((r) => r.status)).toEqual(['ok', 'ok', 'ok']);
    expect(rows[0]!.detail).toMatch(/QEMU emulator version \d/);
    expect(rows[2]!.detail).toMatch(/genisoimage/);
  });

  it('fails for a missing binary and names the field', async () => {
    const rows = await checkTools({ qemuBinary: QEMU, qemuImgBinary: 'qemu-img', isoTool: join(dir, 'no-iso-tool') });
    expect(rows[2]).toMatchObject({ name: 'seed tool', status: 'fail' });
    expect(rows[2]!.fix).toMatch(/drivers\.kvm\.isoTool/);
  });
});

describe('base image', () => {
  const kvm = (baseImage: string, extra: Record<string, unknown> = {}) => ({
    baseImage,
    baseImageFormat: 'qcow2' as const,
    qemuImgBinary: 'qemu-img',
    ...extra,
  });

  it('passes for a standalone qcow2, with format and sizes', async () => {
    const img = join(dir, 'base.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1G']);
    const rows = await checkBaseImage(kvm(img));
    expect(rows[0]!.status).toBe('ok');
    expect(rows[0]!.detail).toMatch(/qcow2, no backing file, 1\.0 GiB virtual/);
  });

  it('fails for an image with a backing file, with the flatten command', async () => {
    const base = join(dir, 'backing-base.qcow2');
    const top = join(dir, 'has-backing.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', base, '1G']);
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    const rows = await checkBaseImage(kvm(top));
    expect(rows[0]!.status).toBe('fail');
    expect(rows[0]!.detail).toMatch(/has a backing file/);
    expect(rows[0]!.fix).toMatch(/qemu-img convert -O qcow2/);
  });

  it('fails when missing without a URL; only warns when the agent will download it', async () => {
    const missing = join(dir, 'missing.qcow2');
    expect((await checkBaseImage(kvm(missing)))[0]!.status).toBe('fail');
    const withUrl = await checkBaseImage(kvm(missing, { baseImageUrl: 'https://images.example.net/x.qcow2' }));
    expect(withUrl[0]!.status).toBe('warn');
    expect(existsSync(missing)).toBe(false); // the doctor never downloads
  });

  it('checks the direct-boot kernel and initrd', async () => {
    const rows = await checkBaseImage(kvm(guest.baseImage, { kernel: guest.kernel, initrd: join(dir, 'no-initrd') }));
    expect(rows.map((r) => [r.name, r.status])).toEqual([['base image', 'ok'], ['kernel', 'ok'], ['initrd', 'fail']]);
  });
});

describe('key file', () => {
  it('passes for a 0600 key and shows the npub', async () => {
    const r = await checkKeyFile(keyFile(0o600));
    expect(r.status).toBe('ok');
    expect(r.detail).toMatch(/npub1[02-9ac-hj-np-z]{58}$/);
  });

  it('fails for a 0644 key with the chmod fix', async () => {
    const file = keyFile(0o644);
    const r = await checkKeyFile(file);
    expect(r.status).toBe('fail');
    expect(r.detail).toMatch(/mode 0644/);
    expect(r.fix).toBe(`chmod 600 ${file}`);
  });

  it('fails for a missing key with how to make one', async () => {
    const r = await checkKeyFile(join(dir, 'none.nsec'));
    expect(r.status).toBe('fail');
    expect(r.fix).toMatch(/keygen/);
  });
});

describe('directories', () => {
  it('passes for a writable directory and for one the agent will create', async () => {
    expect((await checkWritableDir('vm dir', 'drivers.kvm.vmRoot', dir)).status).toBe('ok');
    const later = await checkWritableDir('vm dir', 'drivers.kvm.vmRoot', join(dir, 'a', 'b'));
    expect(later).toMatchObject({ status: 'ok' });
    expect(later.detail).toMatch(/will be created/);
    expect(existsSync(join(dir, 'a'))).toBe(false);
  });

  it('fails when the path runs through a regular file', async () => {
    const file = join(dir, 'plain-file');
    writeFileSync(file, 'x');
    const r = await checkWritableDir('vm dir', 'drivers.kvm.vmRoot', join(file, 'vms'));
    expect(r.status).toBe('fail');
    expect(r.detail).toMatch(/is not a directory/);
    expect(r.fix).toMatch(/drivers\.kvm\.vmRoot/);
  });

  it('fails on a read-only mount (a real write, not access(2))', async () => {
    // /proc/sys is read-only even for root in this container.
    const r = await checkWritableDir('state dir', 'stateDir', '/proc/sys/paygress');
    expect(r.status).toBe('fail');
  });
});

describe('port range', () => {
  const vmRoot = () => join(dir, 'vms-ports');

  it('passes when every port is free', async () => {
    const r = await checkPorts({ bindAddress: '127.0.0.1', portRange: { from: 45200, to: 45209 }, vmRoot: vmRoot() });
    expect(r).toMatchObject({ status: 'ok', detail: '10 of 10 free in 127.0.0.1:45200-45209' });
  });

  it('fails when the only port is taken by another process', async () => {
    await listen(45210);
    const r = await checkPorts({ bindAddress: '127.0.0.1', portRange: { from: 45210, to: 45210 }, vmRoot: vmRoot() });
    expect(r.status).toBe('fail');
    expect(r.detail).toMatch(/taken by other processes: 45210/);
  });

  it('warns when some ports are taken, and does not count its own VMs', async () => {
    await listen(45212);
    await listen(45213);
    mkdirSync(join(vmRoot(), 'w-own'), { recursive: true });
    writeFileSync(join(vmRoot(), 'w-own', 'vm.json'), JSON.stringify({ sshPort: 45213 }));
    const r = await checkPorts({ bindAddress: '127.0.0.1', portRange: { from: 45211, to: 45214 }, vmRoot: vmRoot() });
    expect(r.status).toBe('warn');
    expect(r.detail).toBe("2 of 4 free in 127.0.0.1:45211-45214; taken by other processes: 45212, 1 held by this agent's VMs");
  });
});

describe('relays', () => {
  it('passes: the local relay answers the REQ with EOSE', async () => {
    const [r] = await checkRelays([relay.url]);
    expect(r!.status).toBe('ok');
    expect(r!.detail).toMatch(/EOSE in \d+ ms/);
  });

  it('fails when the only relay is down; warns when another one is up', async () => {
    const [alone] = await checkRelays([DEAD_RELAY], 2_000);
    expect(alone).toMatchObject({ status: 'fail' });
    expect(alone!.detail).toMatch(/ECONNREFUSED/);
    const mixed = await checkRelays([relay.url, DEAD_RELAY], 2_000);
    expect(mixed.map((r) => r.status)).toEqual(['ok', 'warn']);
  });

  it('fails for a listener that never speaks nostr (no EOSE before the timeout)', async () => {
    const srv = await listen(45282);
    srv.on('connection', () => undefined); // accepts TCP, never answers the handshake
    const [r] = await checkRelays(['ws://127.0.0.1:45282'], 1_000);
    expect(r!.status).toBe('fail');
  });
});

describe('public host', () => {
  it('passes for a real address', () => {
    expect(checkPublicHost('198.18.7.1', '0.0.0.0').status).toBe('ok');
    expect(checkPublicHost('vm.paygress-provider.dev', '0.0.0.0').status).toBe('ok');
  });

  it('fails for the example config placeholder and warns for loopback / loopback-only ports', () => {
    const r = checkPublicHost('203.0.113.7', '0.0.0.0');
    expect(r.status).toBe('fail');
    expect(r.fix).toMatch(/provider\.publicHost/);
    expect(checkPublicHost('provider.example.net', '0.0.0.0').status).toBe('fail');
    expect(checkPublicHost('127.0.0.1', '127.0.0.1').status).toBe('warn');
    expect(checkPublicHost('198.18.7.1', '127.0.0.1').status).toBe('warn');
  });
});

describe('the CLI', () => {
  function writeConfig(over: { keyMode?: number; publicHost?: string; relays?: string[] } = {}): string {
    const root = mkdtempSync(join(dir, 'cli-'));
    const cfg = {
      provider: { keyFile: keyFile(over.keyMode ?? 0o600), publicHost: over.publicHost ?? '127.0.0.1' },
      relays: over.relays ?? [relay.url],
      stateDir: join(root, 'state'),
      tiers: [{ level: 'dedicated-host', driver: 'kvm' }],
      plans: [{ id: 'tiny', name: 'Tiny', vcpus: 1, memoryMb: 256, diskGb: 2 }],
      defaultPlan: 'tiny',
      drivers: {
        kvm: {
          accel: 'tcg',
          vmRoot: join(root, 'vms'),
          baseImage: guest.baseImage,
          kernel: guest.kernel,
          initrd: guest.initrd,
          bindAddress: '127.0.0.1',
          portRange: { from: 45230, to: 45239 },
        },
      },
    };
    const file = join(root, 'provider.json');
    writeFileSync(file, JSON.stringify(cfg));
    return file;
  }
  const cli = (args: string[]) => execa('node', ['--import', 'tsx', AGENT_CLI, ...args], { reject: false, stdin: 'ignore', env: { LOG_FORMAT: 'json' } });

  it('doctor prints the table and exits 0 when nothing blocks', async () => {
    const res = await cli(['doctor', '--config', writeConfig()]);
    expect(res.stdout).toMatch(/^STATUS\s+CHECK\s+RESULT$/m);
    expect(res.stdout).toMatch(/^ok\s+key file\s+/m);
    expect(res.stdout).toMatch(/^WARN\s+public host\s+127\.0\.0\.1 is loopback/m);
    expect(res.stdout).toMatch(/0 blockers$/m);
    expect(res.exitCode).toBe(0);
  });

  it('doctor exits 78 on a blocker and prints the fix under it; --json gives the rows', async () => {
    const file = writeConfig({ publicHost: '203.0.113.7', relays: [DEAD_RELAY] });
    const res = await cli(['doctor', '--config', file]);
    expect(res.exitCode).toBe(78);
    expect(res.stdout).toMatch(/^FAIL\s+public host\s+203\.0\.113\.7 is a documentation placeholder.*\n\s+fix: set provider\.publicHost/m);
    expect(res.stdout).toMatch(/^FAIL\s+relay ws:\/\/127\.0\.0\.1:45281/m);
    const json = await cli(['doctor', '--json', '--config', file]);
    const rows = JSON.parse(json.stdout) as { name: string; status: string }[];
    expect(rows.find((r) => r.name === 'public host')?.status).toBe('fail');
  });

  it('run refuses to run as root without --allow-root: exit 78, says why, starts nothing', async () => {
    expect(process.getuid?.()).toBe(0);
    const res = await cli(['run', '--config', writeConfig()]);
    expect(res.exitCode).toBe(78);
    expect(res.stderr).toMatch(/refusing to run as root/);
    expect(res.stderr).toMatch(/User=paygress/);
    expect(res.stdout).not.toMatch(/agent listening/);
  });

  it('run refuses to start on a blocker (0644 key), exits 78 and says why', async () => {
    const res = await cli(['run', '--allow-root', '--config', writeConfig({ keyMode: 0o644 })]);
    expect(res.exitCode).toBe(78);
    expect(res.stderr).toMatch(/not starting, 1 blocking check\(s\) failed/);
    expect(res.stderr).toMatch(/fix: chmod 600 /);
  });

  it('a bad config field is named on stderr with exit 78', async () => {
    const file = writeConfig();
    const cfg = JSON.parse(await import('node:fs').then((fs) => fs.readFileSync(file, 'utf8')));
    cfg.drivers.kvm.portRange.from = 80;
    writeFileSync(file, JSON.stringify(cfg));
    const res = await cli(['doctor', '--config', file]);
    expect(res.exitCode).toBe(78);
    expect(res.stderr).toMatch(/drivers\.kvm\.portRange\.from: .*1024/);
  });

  it('renders every row of a result list', () => {
    const text = renderTable([
      { name: 'a', status: 'ok', detail: 'fine' },
      { name: 'bb', status: 'fail', detail: 'broken', fix: 'mend it' },
    ]);
    expect(text).toBe('STATUS  CHECK  RESULT\nok      a      fine\nFAIL    bb     broken\n               fix: mend it\n\n1 ok, 0 warnings, 1 blocker: the agent will not start until the FAIL rows are fixed\n');
  });
});

describe('logs of a real spawn', () => {
  let agent: AgentProcess | undefined;
  let consumer: ConsumerClient | undefined;
  afterAll(async () => {
    await consumer?.close();
    await agent?.stop();
  });

  it('carry the requestId on every line of the request, and the workloadId once it exists, with phase timings', async () => {
    agent = await startAgentProcess({ relays: [relay.url], guest: { ...guest, readiness: 'ssh-banner' }, portRange: { from: 45240, to: 45249 } });
    await agent.waitForLog(/agent listening/);
    consumer = new ConsumerClient({ sk: generateSecretKey(), provider: agent.pubkey, relays: [relay.url], channel: 'nip17' });
    await consumer.start();
    const reply = await consumer.request({ type: 'spawn', root_password: 'correct-horse-battery' }, { timeoutMs: 60_000 });
    expect(reply.type).toBe('access_details');
    const workloadId = reply.workload_id as string;
    await agent.waitForLog(/"phase":"reply"/, 20_000);

    const lines = agent
      .output()
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    const requestId = lines.find((l) => l.msg === 'request')?.requestId as string;
    expect(requestId).toMatch(/^[0-9a-f]{64}$/);
    // Every line that names this workload also names the request, and vice versa from the id on.
    const ofRequest = lines.filter((l) => l.requestId === requestId || l.workloadId === workloadId);
    for (const l of ofRequest) expect(l.requestId, JSON.stringify(l)).toBe(requestId);
    const firstWithWorkload = ofRequest.findIndex((l) => l.workloadId === workloadId);
    expect(firstWithWorkload).toBeGreaterThan(0);
    for (const l of ofRequest.slice(firstWithWorkload)) expect(l.workloadId, JSON.stringify(l)).toBe(workloadId);
    // No line may name a key twice (child binding + context).
    for (const raw of agent.output().split('\n').filter((l) => l.includes(requestId))) {
      expect(raw.match(/"requestId"/g)?.length, raw).toBe(1);
    }
    const phases = Object.fromEntries(ofRequest.filter((l) => typeof l.phase === 'string').map((l) => [l.phase, l.ms]));
    for (const p of ['overlay', 'seed', 'qemu', 'pidfile', 'reply']) expect(typeof phases[p], p).toBe('number');
    expect(typeof lines.find((l) => l.msg === 'request')?.unwrapMs).toBe('number');
    await consumer.request({ type: 'stop', workload_id: workloadId }, { timeoutMs: 30_000 });
  });
});
