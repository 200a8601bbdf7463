/**
 * An `Outbox` that keeps what the agent sends in memory, in order, so a test
 * can read the conversation instead of a relay. A send can be held (a relay
 * that does not acknowledge yet) or made to fail.
 */
import type { Outbox, Route } from '../../src/agent/outbox.js';
import type { Reply } from '../../src/protocol/replies.js';
import type { Gate } from './gate.js';

/** What the agent sends: replies and notices alike carry a `type`. */
export type Message = { type: string; request_id?: string; workload_id?: string; code?: string; reason?: string } & Record<string, unknown>;

export interface Sent {
  route: Route;
  message: Message;
}

export class MemoryOutbox implements Outbox {
  /** Messages handed over successfully, in the order their sends completed. */
  readonly sent: Sent[] = [];
  /** While set, every send waits on it before it counts as handed over. */
  gate: Gate | undefined;
  /** The next this-many sends reject (after the gate), as a spool that cannot write would. */
  failNext = 0;
  private readonly waiters = new Set<() => void>();

  async send(route: Route, message: Reply): Promise<void> {
    if (this.gate) await this.gate.passed;
    if (this.failNext > 0) {
      this.failNext--;
      throw new Error('outbox refused the message');
    }
    this.sent.push({ route, message: message as unknown as Message });
    for (const wake of [...this.waiters]) wake();
  }

  /** Messages of one type (optionally about one workload), in order. */
  ofType(type: string, workloadId?: string): Sent[] {
    return this.sent.filter((s) => s.message.type === type && (workloadId === undefined || s.message.workload_id === workloadId));
  }

  /** Everything that answers or follows up one request. */
  about(requestId: string): Sent[] {
    return this.sent.filter((s) => s.route.replyTo === requestId);
  }

  /**
   * The first message (already sent or still to come) that matches; rejects
   * after `timeoutMs` listing what was sent, so a failure says what happened instead.
   */
  next(match: (s: Sent) => boolean, what: string, timeoutMs = 20_000): Promise<Sent> {
    const found = this.sent.find(match);
    if (found) return Promise.resolve(found);
    return new Promise<Sent>((resolve, reject) => {
      const check = (): void => {
        const hit = this.sent.find(match);
        if (!hit) return;
        clearTimeout(timer);
        this.waiters.delete(check);
        resolve(hit);
      };
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(new Error(`no ${what} within ${timeoutMs} ms; sent: ${JSON.stringify(this.sent.map((s) => s.message.type))}`));
      }, timeoutMs);
      this.waiters.add(check);
    });
  }
}
