/**
 * The bare floor of a spawn beside which B1 and B2 are read: bench/floor.sh
 * takes the driver's three steps (overlay, seed ISO, `qemu -daemonize`) from a
 * shell, launching the very VM the agent would (the agent's own argv builder).
 */
import { execa } from 'execa';
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildQemuArgv } from '../src/drivers/kvm/argv.js';
import { vmFile } from '../src/drivers/kvm/workload-files.js';
import { buildCloudConfig } from '../src/drivers/kvm/cloud-config.js';
import { canBind } from '../src/drivers/kvm/ports.js';
import { readPidfile, stopVmProcess } from '../src/drivers/kvm/process.js';
import { hashPassword } from '../src/util/sha512crypt.js';
import type { TinyGuest } from '../test/support/tiny-guest.js';
import { password, PLAN } from './spawn.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
/** Ports well away from the tests' ranges and from the bench agent's. */
const FLOOR_PORTS = { from: 47200, to: 47299 };

/** What every floor run shares: the bench's temp root, the guest, the seed's source folder. */
export interface FloorSetup {
  root: string;
  guest: TinyGuest;
  floorSeed: string;
}

/** The floor's seed: the same cloud-config the driver writes, with a hash made once (not a floor step). */
export function writeFloorSeed(root: string): string {
  const floorSeed = path.join(root, 'floor-seed');
  mkdirSync(floorSeed, { recursive: true, mode: 0o700 });
  const seed = buildCloudConfig({
    hostname: 'pgbench-floor',
    passwordHash: hashPassword(password()),
    sshKeys: [],
    finalMessageToken: randomBytes(12).toString('base64url'),
    instanceId: `pgbench-floor-${randomUUID()}`,
  });
  writeFileSync(path.join(floorSeed, 'user-data'), seed.userData, { mode: 0o600 });
  writeFileSync(path.join(floorSeed, 'meta-data'), seed.metaData, { mode: 0o600 });
  return floorSeed;
}

export interface FloorSample {
  overlay_ms: number;
  seed_ms: number;
  qemu_ms: number;
  total_ms: number;
  wall_ms: number;
}

export interface FloorRun {
  /** Runs floor.sh; resolves with its step times once `qemu -daemonize` returned. */
  run(): Promise<FloorSample>;
  /** Stops the floor's qemu and removes its folder. */
  cleanup(): Promise<void>;
}

/** Everything the floor needs before its clock starts: folder, port, the agent's own argv for the same VM. */
export async function prepareFloor(ctx: FloorSetup, i: number, taken: Set<number>): Promise<FloorRun> {
  const name = `pgbench-floor-${i}`;
  const dir = path.join(ctx.root, 'floor', String(i));
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const port = await freePort(FLOOR_PORTS, taken);
  taken.add(port);
  const argv = buildQemuArgv({
    accel: 'tcg',
    name,
    uuid: randomUUID(),
    dir,
    vcpus: PLAN.vcpus,
    memoryMb: PLAN.memoryMb,
    bindAddress: '127.0.0.1',
    sshPort: port,
    kernel: ctx.guest.kernel,
    initrd: ctx.guest.initrd,
    append: ctx.guest.append,
    // The agent's default guest network (config drivers.kvm.network).
    network: 'restricted',
    // The naive sequence: seed on the command line, the VM runs at once.
    seedAtStart: true,
  });
  const argvFile = path.join(ctx.root, 'floor', `${i}.argv`);
  writeFileSync(argvFile, argv.map((a) => `${a}\0`).join(''));
  return {
    async run() {
      const t0 = performance.now();
      const res = await execa('bash', [path.join(HERE, 'floor.sh'), dir, ctx.guest.baseImage, 'qcow2', String(PLAN.diskGb), ctx.floorSeed, argvFile], {
        stdin: 'ignore',
        reject: false,
      });
      const wall = performance.now() - t0;
      if (res.exitCode !== 0) throw new Error(`floor.sh failed: ${res.stderr}`);
      return { ...(JSON.parse(res.stdout) as Omit<FloorSample, 'wall_ms'>), wall_ms: wall };
    },
    async cleanup() {
      const pid = await readPidfile(vmFile(dir, 'pidfile'));
      if (pid !== undefined) await stopVmProcess(pid, name, 5_000);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export async function floorOnce(ctx: FloorSetup, i: number): Promise<FloorSample> {
  const f = await prepareFloor(ctx, i, new Set());
  try {
    return await f.run();
  } finally {
    await f.cleanup();
  }
}

async function freePort(range: { from: number; to: number }, taken: Set<number>): Promise<number> {
  for (let p = range.from; p <= range.to; p++) {
    if (taken.has(p)) continue;
    if (await canBind('127.0.0.1', p)) return p;
  }
  throw new Error(`no free port in ${range.from}-${range.to}`);
}
