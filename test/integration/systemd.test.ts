/**
 * The systemd files and least privilege, checked from the host (the unit under
 * a real systemd PID 1 is systemd-real.test.ts):
 * - sysusers and tmpfiles files applied to a scratch root (`--root`),
 * - `systemd-analyze verify` and `systemd-analyze security --offline=yes` on
 *   the unit with ExecStart pointed at a real binary,
 * - the agent run as the service user with the unit's umask, no-new-privs,
 *   an empty capability bounding set and Environment=, spawning a VM over a
 *   real relay: qemu runs as that user and the VM files are private.
 */
import { execa } from 'execa';
import { chmodSync, chownSync, copyFileSync, cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { generateSecretKey, getPublicKey } from 'nostr-tools';
import { nsecEncode } from 'nostr-tools/nip19';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConsumerClient } from '../../src/client/consumer.js';
import { startRelay, type LocalRelay } from '../support/relay.js';
import { ensureTinyGuest, type TinyGuest } from '../support/tiny-guest.js';
import { processRuns, until } from '../support/net.js';

const REPO = resolve(import.meta.dirname, '..', '..');
const UNIT = join(REPO, 'systemd', 'paygress-agent.service');
const SYSUSERS = join(REPO, 'systemd', 'paygress-agent.sysusers');
const TMPFILES = join(REPO, 'systemd', 'paygress-agent.tmpfiles');
const USER = 'paygress';
const PORTS = { from: 45180, to: 45189 };

const scratch: string[] = [];
function tmp(prefix: string): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  scratch.push(d);
  return d;
}

function passwdEntry(file: string, name: string): string[] | undefined {
  return readFileSync(file, 'utf8').split('\n').map((l) => l.split(':')).find((f) => f[0] === name);
}

/** The unit's Environment= and UMask= lines. */
function unitSettings(): { env: Record<string, string>; umask: string } {
  const env: Record<string, string> = {};
  let umask = '0022';
  for (const line of readFileSync(UNIT, 'utf8').split('\n')) {
    const m = /^Environment=(\w+)=(.*)$/.exec(line);
    if (m) env[m[1]!] = m[2]!;
    const u = /^UMask=(\d+)$/.exec(line);
    if (u) umask = u[1]!;
  }
  return { env, umask };
}

describe('systemd unit, sysusers and tmpfiles', () => {
  afterAll(() => {
    for (const d of scratch) rmSync(d, { recursive: true, force: true });
  });

  it('sysusers creates a system user in the kvm group (scratch root)', async () => {
    const root = tmp('pga-sysusers-');
    mkdirSync(join(root, 'etc'));
    await execa('systemd-sysusers', [`--root=${root}`, SYSUSERS]);
    const user = passwdEntry(join(root, 'etc', 'passwd'), USER);
    expect(user).toBeDefined();
    expect(Number(user![2])).toBeLessThan(1000);
    expect(user![6]).toMatch(/nologin$/);
    const kvm = passwdEntry(join(root, 'etc', 'group'), 'kvm');
    expect(kvm?.[3]?.split(',')).toContain(USER);
  });

  it('tmpfiles creates the state folders private to the service user (scratch root)', async () => {
    const root = tmp('pga-tmpfiles-');
    mkdirSync(join(root, 'etc'));
    await execa('systemd-sysusers', [`--root=${root}`, SYSUSERS]);
    await execa('systemd-tmpfiles', ['--create', `--root=${root}`, TMPFILES]);
    const uid = Number(passwdEntry(join(root, 'etc', 'passwd'), USER)![2]);
    for (const [dir, mode] of [['var/lib/paygress-agent', 0o700], ['var/lib/paygress-agent/vms', 0o700], ['etc/paygress-agent', 0o750]] as const) {
      const s = statSync(join(root, dir));
      expect(s.mode & 0o777, dir).toBe(mode);
      if (dir.startsWith('var')) expect(s.uid, dir).toBe(uid);
    }
  });

  it('the unit passes systemd-analyze verify and gets an exposure score', async () => {
    // verify resolves User= against the host: create the user for real (idempotent).
    await execa('systemd-sysusers', [SYSUSERS]);
    const dir = tmp('pga-unit-');
    const unit = join(dir, 'paygress-agent.service');
    writeFileSync(unit, readFileSync(UNIT, 'utf8').replace(/^ExecStart=\S+/m, `ExecStart=${process.execPath}`));
    const verify = await execa('systemd-analyze', ['verify', '--man=no', unit], { reject: false, all: true });
    expect(verify.all ?? '').not.toContain('paygress-agent.service:');
    expect(verify.exitCode).toBe(0);
    const sec = await execa('systemd-analyze', ['security', '--offline=yes', unit], { reject: false, all: true });
    const m = /Overall exposure level for paygress-agent\.service: (\d+\.\d)/.exec(sec.all ?? '');
    expect(m).not.toBeNull();
    console.log(`[systemd] systemd-analyze security --offline=yes: exposure ${m![1]} (0 = fully locked down, 10 = unprotected)`);
    expect(Number(m![1])).toBeLessThanOrEqual(2.0);
  });

  describe('the agent as the service user', () => {
    let relay: LocalRelay;
    let guest: TinyGuest;
    let root: string;
    let uid: number;
    let gid: number;
    let agent: ReturnType<typeof execa> | undefined;
    let out = '';
    let sk: Uint8Array;

    beforeAll(async () => {
      await execa('systemd-sysusers', [SYSUSERS]);
      uid = Number((await execa('id', ['-u', USER])).stdout);
      gid = Number((await execa('id', ['-g', USER])).stdout);
      guest = await ensureTinyGuest();
      relay = await startRelay();
      // The guest cache lives under /root: copy what the VM needs where the user can read it.
      root = tmp('pga-svcuser-');
      chmodSync(root, 0o755);
      const g = join(root, 'guest');
      mkdirSync(g);
      for (const f of [guest.kernel, guest.initrd, guest.baseImage]) copyFileSync(f, join(g, f.split('/').pop()!));
      const state = join(root, 'state');
      mkdirSync(state, { mode: 0o700 });
      sk = generateSecretKey();
      writeFileSync(join(state, 'provider.nsec'), `${nsecEncode(sk)}\n`, { mode: 0o600 });
      const config = {
        provider: { keyFile: join(state, 'provider.nsec'), publicHost: '127.0.0.1', name: 'service-user test' },
        relays: [relay.url],
        stateDir: join(state, 'db'),
        tiers: [{ level: 'dedicated-host', driver: 'kvm' }],
        plans: [{ id: 'tiny', name: 'Tiny', description: 'test', vcpus: 1, memoryMb: 256, diskGb: 1, durationSeconds: 600 }],
        defaultPlan: 'tiny',
        drivers: {
          kvm: {
            accel: 'tcg',
            vmRoot: join(state, 'vms'),
            overlayTemplateDir: join(state, 'cache'),
            baseImage: join(g, 'base.qcow2'),
            kernel: join(g, 'vmlinuz'),
            initrd: join(g, 'initrd.img'),
            append: guest.append,
            readiness: 'ssh-banner',
            bindAddress: '127.0.0.1',
            portRange: PORTS,
            stopTimeoutMs: 5_000,
          },
        },
      };
      writeFileSync(join(state, 'provider.json'), JSON.stringify(config));
      for (const p of [root, g, ...readdirSync(g).map((f) => join(g, f)), state, ...readdirSync(state).map((f) => join(state, f))]) {
        chownSync(p, uid, gid);
      }
      // Install the agent as an operator would (compiled, with its node
      // modules) somewhere the service user can read: the checkout itself may
      // sit under a folder only root can enter.
      const app = join(root, 'app');
      await execa(process.execPath, [join(REPO, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(REPO, 'tsconfig.json'), '--outDir', join(app, 'dist')]);
      cpSync(join(REPO, 'node_modules'), join(app, 'node_modules'), { recursive: true, dereference: true });
      copyFileSync(join(REPO, 'package.json'), join(app, 'package.json'));
      const { env, umask } = unitSettings();
      const cmd = [
        '--reuid', USER, '--regid', USER, '--init-groups',
        // What NoNewPrivileges=yes and an empty CapabilityBoundingSet= give the unit.
        '--no-new-privs', '--bounding-set=-all', '--inh-caps=-all',
        'sh', '-c', `umask ${umask} && exec "$0" "$@"`,
        process.execPath, join(app, 'dist', 'src', 'cli', 'agent.js'), 'run', '--config', join(state, 'provider.json'),
      ];
      agent = execa('setpriv', cmd, {
        reject: false,
        stdin: 'ignore',
        all: true,
        cwd: app,
        extendEnv: false,
        env: { PATH: '/usr/local/bin:/usr/bin:/bin', HOME: state, TMPDIR: state, ...env },
      });
      agent.all?.on('data', (c: Buffer) => (out += c.toString()));
      await until(() => out.includes('agent listening') || agent!.exitCode !== null, 60_000, 'agent listening');
      expect(out).toContain('agent listening');
    }, 600_000);

    afterAll(async () => {
      agent?.kill('SIGTERM');
      await agent?.catch(() => undefined);
      await relay?.stop();
      // VMs outlive the agent by design: a test that failed before its stop leaves one behind.
      const vms = root ? join(root, 'state', 'vms') : undefined;
      for (const id of vms && existsSync(vms) ? readdirSync(vms) : []) {
        try {
          const pid = Number(readFileSync(join(vms!, id, 'qemu.pid'), 'utf8').trim() || 0);
          if (pid > 1 && processRuns(pid, join(vms!, id))) process.kill(pid, 'SIGKILL');
        } catch {
          // no pidfile or already gone
        }
      }
    });

    it('starts, spawns a VM whose qemu runs as the service user with private files, and stops it', async () => {
      const status = readFileSync(`/proc/${agent!.pid}/status`, 'utf8');
      // setpriv execs sh, sh execs node: the pid is the agent itself.
      expect(/^Uid:\s+(\d+)/m.exec(status)?.[1]).toBe(String(uid));
      expect(/^NoNewPrivs:\s+(\d)/m.exec(status)?.[1]).toBe('1');
      expect(/^CapBnd:\s+(\w+)/m.exec(status)?.[1]).toMatch(/^0+$/);

      const c = new ConsumerClient({ sk: generateSecretKey(), provider: getPublicKey(sk), relays: [relay.url], channel: 'nip17' });
      await c.start();
      try {
        const reply = await c.request({ type: 'spawn', root_password: 'a-password-for-the-test' }, { timeoutMs: 90_000 });
        expect(reply.type, JSON.stringify(reply)).toBe('access_details');
        const id = reply.workload_id as string;
        const dir = join(root, 'state', 'vms', id);
        const pid = Number(readFileSync(join(dir, 'qemu.pid'), 'utf8').trim());
        const qemu = readFileSync(`/proc/${pid}/status`, 'utf8');
        expect(/^Uid:\s+(\d+)\s+(\d+)/m.exec(qemu)?.slice(1)).toEqual([String(uid), String(uid)]);
        expect(statSync(dir).mode & 0o777).toBe(0o700);
        const modes = readdirSync(dir)
          .filter((f) => statSync(join(dir, f)).isFile())
          .map((f) => `${f} ${(statSync(join(dir, f)).mode & 0o777).toString(8)}`);
        expect(modes.filter((m) => !m.endsWith(' 600')), modes.join(', ')).toEqual([]);
        const stopped = await c.request({ type: 'stop', workload_id: id }, { timeoutMs: 30_000 });
        expect(stopped.type).toBe('stopped');
        // A zombie keeps /proc/<pid>; processRuns counts it as gone.
        await until(() => !processRuns(pid), 15_000, 'qemu gone');
      } finally {
        await c.close();
      }
    }, 240_000);
  });
});
