/**
 * The phase-timing contract (docs/logs.md) read from lines pino writes as the
 * driver writes them (a child logger bound to the workload id): other lines
 * and other workloads skipped, garbage never thrown on. That the driver keeps
 * the contract is checked with real qemu in test/integration/spawn-stop.test.ts.
 */
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { parsePhaseLine, spawnPhasesOf, SPAWN_PHASES } from '../../bench/phases.js';
import { REDACT_PATHS } from '../../src/util/logger.js';

/** A logger configured like createLogger's JSON output, into a string. */
function capture(): { log: pino.Logger; text: () => string } {
  let out = '';
  const sink = new Writable({
    write(chunk, _enc, done) {
      out += String(chunk);
      done();
    },
  });
  const log = pino({ redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, sink);
  return { log, text: () => out };
}

describe('phase timings', () => {
  it('reads every spawn phase of one workload and the driver total, skipping other workloads and lines', () => {
    const { log, text } = capture();
    const w = log.child({ workloadId: 'w-0123456789ab' });
    const other = log.child({ workloadId: 'w-ffffffffffff' });
    w.info({ phase: 'overlay', ms: 41 }, 'disk overlay created');
    other.info({ phase: 'overlay', ms: 9999 }, 'disk overlay created');
    w.info({ phase: 'seed', ms: 30 }, 'seed ISO written');
    w.info({ phase: 'qemu', ms: 120, exitCode: 0, sshPort: 40000 }, 'qemu launcher returned');
    w.info({ phase: 'pidfile', ms: 2, pid: 7 }, 'qemu running, paused');
    w.info({ phase: 'start', ms: 15, totalMs: 190 }, 'workload started');
    w.info({ phase: 'reply', ms: 3 }, 'reply handed to the relays');
    w.info({ ms: 5 }, 'a line without a phase');
    expect(spawnPhasesOf(`${text()}not json at all\n{"phase":\n`, 'w-0123456789ab')).toEqual({
      overlay: 41,
      seed: 30,
      qemu: 120,
      pidfile: 2,
      start: 15,
      driverTotal: 190,
    });
    expect(SPAWN_PHASES).toEqual(['overlay', 'seed', 'qemu', 'pidfile', 'start']);
  });

  it('is total: lines that break the contract are skipped, never thrown on', () => {
    for (const line of ['', 'null', '[]', '"phase"', '{"phase":"qemu","ms":"7","workloadId":"w-1"}', '{"phase":"qemu","ms":7}', '{"phase":1,"ms":7,"workloadId":"w"}']) {
      expect(parsePhaseLine(line)).toBeUndefined();
    }
  });
});
