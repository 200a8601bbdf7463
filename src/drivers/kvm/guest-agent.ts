/**
 * A client for the qemu guest agent on a VM's virtio-serial socket: the I/O
 * edge around guest-agent-protocol.ts. One session = one connection; every
 * session starts with a delimited sync before any answer is believed, every
 * command has its own timeout, and reads are bounded. Whatever the guest
 * says reaches errors only through `guestText` (bounded, sanitised).
 */
import { randomInt } from 'node:crypto';
import { connect, type Socket } from 'node:net';
import {
  AnswerFramer,
  encodeCommand,
  isSyncAnswer,
  parseAnswer,
  syncRequest,
  type Frame,
  type QgaCommand,
} from './guest-agent-protocol.js';

/**
 * Why a session failed. `lie`: the guest said something no honest qemu-ga
 * says (not JSON, a wrong sync id, a wrong shape, too much). `refused`: an
 * honest error answer. `timeout`, `closed` (connection ended), `unreachable`
 * (no socket / nobody listening), `aborted` (the caller's signal).
 */
export type GuestAgentFailure = 'lie' | 'refused' | 'timeout' | 'closed' | 'unreachable' | 'aborted';

export class GuestAgentError extends Error {
  constructor(
    readonly reason: GuestAgentFailure,
    message: string,
  ) {
    super(message);
    this.name = 'GuestAgentError';
  }
}

/** An answer line is small (the biggest the driver asks for is a few hundred bytes of a file, base64'd). */
const DEFAULT_MAX_ANSWER_BYTES = 64 * 1024;
/** Stale delimited sync answers to skip (earlier syncs of ours that timed out) before calling it a lie. */
const MAX_STALE_SYNCS = 8;
/** Answers queued unread: more than any batch of ours asks for, so more is a guest talking unasked. */
const MAX_QUEUED_FRAMES = 64;

export interface SessionOptions {
  connectTimeoutMs: number;
  signal?: AbortSignal;
  maxAnswerBytes?: number;
}

export class GuestAgentSession {
  private readonly framer: AnswerFramer;
  private readonly frames: Frame[] = [];
  private ended: GuestAgentError | undefined;
  private wake: (() => void) | undefined;

  private constructor(
    private readonly sock: Socket,
    maxAnswerBytes: number,
    private readonly signal: AbortSignal | undefined,
  ) {
    this.framer = new AnswerFramer(maxAnswerBytes);
    sock.on('data', (chunk: Buffer) => {
      this.frames.push(...this.framer.push(chunk));
      if (this.frames.length > MAX_QUEUED_FRAMES) {
        this.frames.length = 0;
        this.end(new GuestAgentError('lie', 'the guest agent sent more answers than were asked for'));
      }
      this.poke();
    });
    sock.on('error', (err: NodeJS.ErrnoException) => this.end(new GuestAgentError('closed', `guest agent socket: ${err.code ?? 'error'}`)));
    sock.on('close', () => this.end(new GuestAgentError('closed', 'the guest agent channel closed')));
    signal?.addEventListener('abort', this.onAbort, { once: true });
  }

  private readonly onAbort = () => this.end(new GuestAgentError('aborted', 'aborted'));

  /** Connect to the agent's socket. Nothing is read or written yet. */
  static open(socketPath: string, opts: SessionOptions): Promise<GuestAgentSession> {
    return new Promise((resolve, reject) => {
      if (opts.signal?.aborted) {
        reject(new GuestAgentError('aborted', 'aborted'));
        return;
      }
      const sock = connect({ path: socketPath });
      const fail = (err: GuestAgentError) => {
        clearTimeout(timer);
        sock.destroy();
        reject(err);
      };
      const timer = setTimeout(() => fail(new GuestAgentError('timeout', `no connection to the guest agent within ${opts.connectTimeoutMs} ms`)), opts.connectTimeoutMs);
      sock.once('error', (err: NodeJS.ErrnoException) => fail(new GuestAgentError('unreachable', `guest agent socket: ${err.code ?? 'error'}`)));
      sock.once('connect', () => {
        clearTimeout(timer);
        sock.removeAllListeners('error');
        resolve(new GuestAgentSession(sock, opts.maxAnswerBytes ?? DEFAULT_MAX_ANSWER_BYTES, opts.signal));
      });
    });
  }

  /**
   * Flush the channel and prove the agent is listening to us: 0xFF, then
   * `guest-sync-delimited` with a fresh random id; everything before the
   * answer's delimiter is dropped. Answers carrying an id from `earlierIds`
   * (our own syncs that timed out) are skipped, a few times at most; any other
   * answer is a lie. The new id is added to `earlierIds` before it is sent.
   */
  async sync(timeoutMs: number, earlierIds: Set<number> = new Set()): Promise<void> {
    const id = randomInt(1, 2 ** 47);
    earlierIds.add(id);
    const deadline = Date.now() + timeoutMs;
    this.expectDelimited();
    this.write(syncRequest(id));
    for (let skipped = 0; ; ) {
      const answer = parseAnswer(this.lineOf(await this.next(deadline, 'guest-sync-delimited')));
      if (answer.kind === 'return' && isSyncAnswer(answer.value, id)) return;
      const stale = answer.kind === 'return' && typeof answer.value === 'number' && answer.value !== id && earlierIds.has(answer.value);
      if (!stale || ++skipped > MAX_STALE_SYNCS) {
        throw new GuestAgentError('lie', `guest-sync-delimited: ${answer.kind === 'return' ? 'wrong id' : answer.kind === 'error' ? `error ${answer.errorClass}` : answer.why}`);
      }
      // A line already cut after the stale answer may be ours (both came in one chunk): read it before waiting for another delimiter.
      if (this.frames.length === 0) this.framer.expectDelimited();
    }
  }

  /**
   * Only what follows the next delimiter counts: lines already cut (bytes that
   * came before this sync, e.g. late answers to a session's earlier commands)
   * are dropped with the bytes the framer drops.
   */
  private expectDelimited(): void {
    // The framer reads nothing more after an oversized frame: dropping it would turn the lie into a timeout.
    if (this.frames.some((f) => f.kind === 'oversized')) this.end(new GuestAgentError('lie', 'the guest agent sent an oversized answer'));
    this.frames.length = 0;
    this.framer.expectDelimited();
  }

  /** Send one command; resolve with its `return` value. An error answer rejects as `refused`, anything malformed as `lie`. */
  async call(cmd: QgaCommand, timeoutMs: number): Promise<unknown> {
    const [value] = await this.callAll([cmd], timeoutMs);
    return value;
  }

  /**
   * Send several commands at once and resolve with their `return` values in
   * order: qemu-ga answers one command after another, so a batch costs one
   * round trip through the virtio channel instead of one per command. Only
   * for commands that need nothing from each other's answers. The first error
   * or malformed answer rejects (the session is not to be used after that).
   */
  async callAll(cmds: readonly QgaCommand[], timeoutMs: number): Promise<unknown[]> {
    const deadline = Date.now() + timeoutMs;
    this.write(Buffer.concat(cmds.map(encodeCommand)));
    const out: unknown[] = [];
    for (const cmd of cmds) {
      const answer = parseAnswer(this.lineOf(await this.next(deadline, cmd.execute)));
      if (answer.kind === 'error') throw new GuestAgentError('refused', `${cmd.execute}: ${answer.errorClass}${answer.desc ? `: ${answer.desc}` : ''}`);
      if (answer.kind === 'invalid') throw new GuestAgentError('lie', `${cmd.execute}: ${answer.why}`);
      out.push(answer.value);
    }
    return out;
  }

  /** Hang up. Idempotent. */
  close(): void {
    this.end(new GuestAgentError('closed', 'session closed'));
  }

  private lineOf(frame: Frame): string {
    if (frame.kind === 'oversized') {
      this.close();
      throw new GuestAgentError('lie', 'the guest agent sent an oversized answer');
    }
    return frame.text;
  }

  private write(bytes: Buffer): void {
    if (this.ended) throw this.ended;
    this.sock.write(bytes);
  }

  private async next(deadline: number, what: string): Promise<Frame> {
    for (;;) {
      const f = this.frames.shift();
      if (f) return f;
      if (this.ended) throw this.ended;
      const left = deadline - Date.now();
      if (left <= 0) {
        this.end(new GuestAgentError('timeout', `${what}: no answer from the guest agent in time`));
        throw this.ended!;
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wake = undefined;
    }
  }

  private poke(): void {
    this.wake?.();
  }

  private end(reason: GuestAgentError): void {
    if (this.ended) return;
    this.ended = reason;
    this.signal?.removeEventListener('abort', this.onAbort);
    this.sock.destroy();
    this.poke();
  }
}
