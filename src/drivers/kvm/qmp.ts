/**
 * A minimal QMP client: connect to a VM's monitor socket, negotiate, run
 * commands one after another, hang up. QMP speaks one JSON object per line;
 * asynchronous events may come between a command and its answer and are
 * skipped.
 */
import { connect, type Socket } from 'node:net';
import type { QmpCommand } from './argv.js';

export class QmpError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'QmpError';
  }
}

/**
 * Run `commands` in order on the monitor at `socketPath` and resolve with
 * their `return` values; rejects on the first error or after `timeoutMs` in all.
 */
export function runQmp(socketPath: string, commands: readonly QmpCommand[], timeoutMs: number): Promise<unknown[]> {
  return new Promise<unknown[]>((resolve, reject) => {
    const sock: Socket = connect({ path: socketPath });
    let buffered = '';
    let greeted = false;
    /** Index into [qmp_capabilities, ...commands] of the command awaiting its answer. */
    let step = 0;
    const all: QmpCommand[] = [{ execute: 'qmp_capabilities' }, ...commands];
    const returns: unknown[] = [];
    const finish = (err?: Error) => {
      clearTimeout(timer);
      sock.removeAllListeners('data');
      sock.destroy();
      if (err) reject(err);
      else resolve(returns);
    };
    const timer = setTimeout(() => finish(new QmpError(`no answer over QMP within ${timeoutMs} ms`)), timeoutMs);
    const send = () => sock.write(`${JSON.stringify(all[step])}\n`);

    sock.setEncoding('utf8');
    sock.on('error', (err) => finish(new QmpError(`QMP socket: ${err.message}`)));
    sock.on('close', () => finish(new QmpError('qemu closed the QMP connection')));
    sock.on('data', (chunk: string) => {
      buffered += chunk;
      let nl: number;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, nl).trim();
        buffered = buffered.slice(nl + 1);
        if (!line) continue;
        let msg: Record<string, unknown>;
        try {
          msg = JSON.parse(line) as Record<string, unknown>;
        } catch {
          finish(new QmpError('qemu sent something that is not JSON over QMP'));
          return;
        }
        if (!greeted) {
          if (!('QMP' in msg)) {
            finish(new QmpError('no QMP greeting'));
            return;
          }
          greeted = true;
          send();
          continue;
        }
        if ('event' in msg) continue;
        if ('error' in msg) {
          const e = msg.error as { class?: string; desc?: string };
          finish(new QmpError(`${all[step]!.execute}: ${e.desc ?? e.class ?? 'failed'}`));
          return;
        }
        if (!('return' in msg)) continue;
        if (step > 0) returns.push(msg.return);
        step++;
        if (step === all.length) {
          finish();
          return;
        }
        send();
      }
    });
  });
}
