/**
 * A KVM driver in a child process, so that it (and the qemus it starts) can
 * run inside a network namespace a test made: `ip netns exec NS node --import
 * tsx netns-driver.ts CONFIG.json`. One JSON request per stdin line, one JSON
 * answer per stdout line. CONFIG maps a name to a KvmDriverConfig. Ending the
 * process is an "agent restart": the qemus keep running.
 */
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { KvmDriver } from '../../src/drivers/kvm/index.js';
import type { KvmDriverConfig } from '../../src/drivers/kvm/config.js';
import { silentLogger } from '../../src/util/logger.js';

const configs = JSON.parse(readFileSync(process.argv[2]!, 'utf8')) as Record<string, KvmDriverConfig>;
const drivers = new Map(Object.entries(configs).map(([name, c]) => [name, new KvmDriver(c, silentLogger)]));

interface Request {
  seq: number;
  driver: string;
  op: 'create' | 'destroy' | 'inspect' | 'waitReady' | 'meta' | 'console';
  id: string;
}

async function handle(r: Request): Promise<unknown> {
  const d = drivers.get(r.driver);
  if (!d) throw new Error(`no driver ${r.driver}`);
  switch (r.op) {
    case 'create':
      return d.create({ id: r.id, hostname: r.id, vcpus: 1, memoryMb: 256, diskGb: 1, rootPassword: 'x-not-used-x', sshKeys: [] });
    case 'destroy':
      return d.destroy(r.id);
    case 'inspect':
      return d.inspect(r.id);
    case 'waitReady':
      return d.waitReady(r.id, { timeoutMs: 180_000 });
    case 'meta':
      return d.readMeta(r.id);
    case 'console':
      // qemu keeps the console in a ring: only a read drains it into serial.log.
      return d.readConsole(r.id);
  }
}

const rl = createInterface({ input: process.stdin });
rl.on('line', (line) => {
  const r = JSON.parse(line) as Request;
  handle(r).then(
    (result) => process.stdout.write(`${JSON.stringify({ seq: r.seq, ok: true, result: result ?? null })}\n`),
    (err: Error & { code?: string }) => process.stdout.write(`${JSON.stringify({ seq: r.seq, ok: false, error: err.message, code: err.code })}\n`),
  );
});
rl.on('close', () => {
  for (const d of drivers.values()) d.close();
});
process.stdout.write(`${JSON.stringify({ ready: true })}\n`);
