/**
 * A tenant writing to its serial console without end must not fill the host's
 * disk: the console is a ring in qemu's memory, drained into a size-capped
 * serial.log; the boot_failed tail and a restarted agent still see the latest
 * lines. The tiny guest runs busybox `yes` as its init (kernel command line),
 * printing a line per call as fast as the emulated UART takes it.
 */
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvmDriver } from '../../src/drivers/kvm/index.js';
import { silentLogger } from '../../src/util/logger.js';
import { filesUnder } from '../support/files.js';
import { processRuns } from '../support/net.js';
import { ensureTinyGuest, tinyDriverConfig, type TinyGuest } from '../support/tiny-guest.js';

const SPAM = 'paygress-console-spam';
const CAP = 16 * 1024;

let guest: TinyGuest;
let root: string;
beforeAll(async () => {
  guest = await ensureTinyGuest();
  root = mkdtempSync(join(tmpdir(), 'pga-spam-'));
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

describe('a guest spamming its console', () => {
  it('leaves a bounded workload folder; the boot_failed tail and a restarted driver still see the newest lines', async () => {
    const config = tinyDriverConfig(guest, {
      vmRoot: join(root, 'vms'),
      portRange: { from: 47210, to: 47219 },
      namePrefix: 'paygress-spam-',
      append: `console=ttyS0 quiet rdinit=/bin/busybox -- yes ${SPAM}`,
      consoleLogBytes: CAP,
    });
    const d = new KvmDriver(config, silentLogger);
    const h = await d.create({ id: 'spam1', hostname: 'spam1', vcpus: 1, memoryMb: 256, diskGb: 1, rootPassword: 'not-a-real-password-1', sshKeys: [] });
    try {
      // No banner ever comes (yes is PID 1): the watch ends in a timeout with the console's tail.
      const result = await d.waitReady('spam1', { timeoutMs: 25_000 });
      expect(result).toMatchObject({ ready: false, reason: 'timeout' });
      expect(result.ready ? '' : result.consoleTail).toContain(SPAM);
      const serial = join(h.dir, 'serial.log');
      const afterWatch = statSync(serial).size;
      // Output went well past the cap (a file console would hold all of it), the log kept at most the cap.
      expect(afterWatch).toBeGreaterThanOrEqual(CAP / 2);
      expect(afterWatch).toBeLessThanOrEqual(CAP);

      // Nobody drains now: the guest keeps writing into qemu's ring, not to disk.
      await sleep(5_000);
      expect(statSync(serial).size).toBe(afterWatch);

      // A restarted agent (a new driver) reads on from the log and the ring.
      const again = new KvmDriver(config, silentLogger);
      const text = await again.readConsole('spam1');
      expect(text).toContain(SPAM);
      expect(statSync(serial).size).toBeLessThanOrEqual(CAP);
      again.close();

      // Everything but the tenant's own disk and seed stays small.
      const other = filesUnder(h.dir).filter((f) => !/\/(disk\.qcow2|seed\.iso)$/.test(f));
      const bytes = other.reduce((n, f) => n + statSync(f).size, 0);
      expect(bytes).toBeLessThanOrEqual(CAP + 4096);
    } finally {
      await d.destroy('spam1');
      d.close();
    }
    expect(processRuns(h.pid)).toBe(false);
  }, 180_000);
});
