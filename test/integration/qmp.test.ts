/**
 * runQmp against a real qemu started paused (as the driver starts it), and
 * against peers that are not a working QMP monitor.
 */
import { randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { attachSeedAndStart, buildQemuArgv } from '../../src/drivers/kvm/argv.js';
import { vmFile } from '../../src/drivers/kvm/workload-files.js';
import { QmpError, runQmp } from '../../src/drivers/kvm/qmp.js';
import { processRuns } from '../support/net.js';
import { ensureTinyGuest } from '../support/tiny-guest.js';

let root: string;
let dir: string;
let pid: number;
const servers: Server[] = [];

beforeAll(async () => {
  const guest = await ensureTinyGuest();
  root = mkdtempSync(join(tmpdir(), 'pga-qmp-'));
  dir = join(root, 'vm');
  await execa('mkdir', ['-m', '0700', dir]);
  await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', guest.baseImage, '-F', 'qcow2', vmFile(dir, 'disk'), '1G']);
  const argv = buildQemuArgv({
    accel: 'tcg',
    name: 'pgqmptest-vm',
    uuid: randomUUID(),
    dir,
    vcpus: 1,
    memoryMb: 128,
    bindAddress: '127.0.0.1',
    sshPort: 47891,
    kernel: guest.kernel,
    initrd: guest.initrd,
    append: guest.append,
    network: 'restricted',
  });
  await execa('qemu-system-x86_64', argv);
  pid = Number(readFileSync(vmFile(dir, 'pidfile'), 'utf8'));
});

afterAll(() => {
  if (pid) process.kill(pid, 'SIGKILL');
  for (const s of servers) s.close();
  if (root) rmSync(root, { recursive: true, force: true });
});

/** A unix socket server that greets each connection with `greeting` and then says nothing. */
function peer(name: string, greeting: string): Promise<string> {
  const file = join(root, name);
  return new Promise((resolve) => {
    const srv = createServer((c) => {
      c.on('error', () => undefined);
      if (greeting) c.write(greeting);
    });
    servers.push(srv);
    srv.listen(file, () => resolve(file));
  });
}

async function status(): Promise<string> {
  const [r] = await runQmp(vmFile(dir, 'qmpSocket'), [{ execute: 'query-status' }], 5_000);
  return (r as { status: string }).status;
}

describe('runQmp', () => {
  it('reports qemu’s own error for a command that fails, and the VM stays paused and alive', async () => {
    // No seed.iso was written in this folder: blockdev-add must fail and name it.
    const err = await runQmp(vmFile(dir, 'qmpSocket'), attachSeedAndStart(dir), 5_000).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpError);
    expect((err as Error).message).toMatch(/^blockdev-add: /);
    expect((err as Error).message).toContain('seed.iso');
    expect(processRuns(pid, 'pgqmptest-vm')).toBe(true);
    expect(await status()).toBe('prelaunch');
  });

  it('runs commands in order on a paused VM and returns what each returned', async () => {
    const got = await runQmp(vmFile(dir, 'qmpSocket'), [{ execute: 'query-status' }, { execute: 'cont' }, { execute: 'query-status' }], 5_000);
    expect(got).toEqual([
      expect.objectContaining({ status: 'prelaunch', running: false }),
      {},
      expect.objectContaining({ status: 'running', running: true }),
    ]);
  });

  it('refuses a peer that does not greet like QMP', async () => {
    const file = await peer('not-qmp.sock', '{"hello": "world"}\n');
    await expect(runQmp(file, [{ execute: 'cont' }], 2_000)).rejects.toThrow(/no QMP greeting/);
  });

  it('refuses a peer that sends something other than JSON', async () => {
    const file = await peer('garbage.sock', 'SSH-2.0-OpenSSH\n');
    await expect(runQmp(file, [{ execute: 'cont' }], 2_000)).rejects.toThrow(/not JSON/);
  });

  it('gives up after its timeout when the peer stays silent', async () => {
    const file = await peer('silent.sock', '');
    const t = Date.now();
    await expect(runQmp(file, [{ execute: 'cont' }], 300)).rejects.toThrow(/within 300 ms/);
    expect(Date.now() - t).toBeLessThan(5_000);
  });

  it('says so when there is no socket', async () => {
    await expect(runQmp(join(root, 'missing.sock'), [{ execute: 'cont' }], 1_000)).rejects.toThrow(/QMP socket: .*ENOENT/);
  });
});
