/**
 * The qemu guest agent's wire protocol, pure: the commands the driver sends,
 * a framer that cuts the byte stream from the guest into answers, and total
 * parsers for what comes back. Nothing here does I/O.
 *
 * Everything the guest sends is untrusted: every parser returns `undefined`
 * (or an `invalid` answer) for anything it does not expect, and guest text
 * only ever leaves this module through `guestText`, bounded and sanitised.
 *
 * Protocol (qemu-ga 7.2): one JSON command in, one JSON answer out, each
 * answer ending in a newline. A client first sends the byte 0xFF (which resets
 * the agent's JSON parser) and `guest-sync-delimited` with a random id; the
 * agent puts 0xFF before that one answer, so anything stale in the channel
 * (answers to an earlier client that gave up) is dropped up to the delimiter,
 * and the id proves the answer after it is to this command.
 */
/** The byte that resets the agent's parser and that precedes a delimited sync answer. */
const QGA_DELIMITER = 0xff;

export interface QgaCommand {
  execute: string;
  arguments?: Record<string, unknown>;
}

/** The serial port name qemu-ga looks for (its systemd unit starts when a port of this name appears). */
export const QGA_PORT_NAME = 'org.qemu.guest_agent.0';

/** Same charset as workload ids; a DNS label. */
const HOSTNAME_RE = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
/** Absolute path of printable ASCII without `..` segments. */
const GUEST_PATH_RE = /^(\/[A-Za-z0-9._-]+)+$/;
const MAX_KEY_LENGTH = 16_384;
const MAX_KEYS = 64;

/** The bytes that start every session: parser reset, then the delimited sync. */
export function syncRequest(id: number): Buffer {
  if (!Number.isSafeInteger(id) || id <= 0) throw new RangeError('sync id must be a positive safe integer');
  return Buffer.concat([Buffer.from([QGA_DELIMITER]), encodeCommand({ execute: 'guest-sync-delimited', arguments: { id } })]);
}

export function encodeCommand(cmd: QgaCommand): Buffer {
  return Buffer.from(`${JSON.stringify(cmd)}\n`, 'utf8');
}

export function ping(): QgaCommand {
  return { execute: 'guest-ping' };
}

/**
 * Replace root's authorized_keys with exactly `keys` (`reset`: whatever the
 * file held is dropped). Each key is one line: a newline would add a line of
 * the caller's choosing to the file.
 */
export function setRootAuthorizedKeys(keys: readonly string[]): QgaCommand {
  if (keys.length > MAX_KEYS) throw new RangeError(`at most ${MAX_KEYS} keys`);
  for (const k of keys) {
    // eslint-disable-next-line no-control-regex
    if (k.length === 0 || k.length > MAX_KEY_LENGTH || /[\x00-\x1f\x7f]/.test(k) || k.startsWith('#')) {
      throw new RangeError('each key must be one printable line');
    }
  }
  return { execute: 'guest-ssh-add-authorized-keys', arguments: { username: 'root', keys: [...keys], reset: true } };
}

export function assertHostname(hostname: string): string {
  if (!HOSTNAME_RE.test(hostname)) throw new RangeError('hostname must be a DNS label of [a-z0-9-]');
  return hostname;
}

export function fileOpen(path: string, mode: 'r' | 'w'): QgaCommand {
  if (!GUEST_PATH_RE.test(path) || path.split('/').some((s) => s === '.' || s === '..')) throw new RangeError('guest path must be absolute and plain');
  return { execute: 'guest-file-open', arguments: { path, mode } };
}

export function fileWrite(handle: number, data: Buffer): QgaCommand {
  return { execute: 'guest-file-write', arguments: { handle, 'buf-b64': data.toString('base64') } };
}

export function fileRead(handle: number, count: number): QgaCommand {
  return { execute: 'guest-file-read', arguments: { handle, count } };
}

export function fileClose(handle: number): QgaCommand {
  return { execute: 'guest-file-close', arguments: { handle } };
}

// ------------------------------------------------------------------ framing

/** One unit cut from the guest's byte stream. */
export type Frame =
  | { kind: 'line'; text: string }
  /** More than the allowed bytes without the end the framer waits for. */
  | { kind: 'oversized' };

/**
 * Cuts the stream into answers. In `delimited` mode (after a sync request)
 * everything up to the next 0xFF is stale and dropped; then the answer runs to
 * the newline. Bounded: at most `maxBytes` are held while waiting for either.
 */
export class AnswerFramer {
  private held: Buffer = Buffer.alloc(0);
  private awaitingDelimiter = false;
  /** Bytes dropped while waiting for the delimiter. */
  private staleBytes = 0;
  private broken = false;

  constructor(private readonly maxBytes: number) {}

  /** The next answer is a delimited one: drop everything before its 0xFF. */
  expectDelimited(): void {
    this.awaitingDelimiter = true;
  }

  push(chunk: Buffer): Frame[] {
    if (this.broken) return [];
    this.held = this.held.length ? Buffer.concat([this.held, chunk]) : chunk;
    const out: Frame[] = [];
    for (;;) {
      if (this.awaitingDelimiter) {
        const at = this.held.indexOf(QGA_DELIMITER);
        if (at < 0) {
          // Stale bytes are dropped as they come, but not without end.
          this.staleBytes += this.held.length;
          this.held = Buffer.alloc(0);
          if (this.staleBytes > this.maxBytes) return this.fail(out);
          return out;
        }
        this.staleBytes += at;
        if (this.staleBytes > this.maxBytes) return this.fail(out);
        this.held = this.held.subarray(at + 1);
        this.awaitingDelimiter = false;
        this.staleBytes = 0;
      }
      const nl = this.held.indexOf(0x0a);
      if (nl < 0) {
        if (this.held.length > this.maxBytes) return this.fail(out);
        return out;
      }
      if (nl > this.maxBytes) return this.fail(out);
      // A delimited answer's own 0xFF can lead a line cut outside delimited mode; it is never part of UTF-8 JSON.
      let start = 0;
      while (start < nl && this.held[start] === QGA_DELIMITER) start++;
      const line = this.held.subarray(start, nl).toString('utf8').trim();
      this.held = this.held.subarray(nl + 1);
      if (line) out.push({ kind: 'line', text: line });
    }
  }

  private fail(out: Frame[]): Frame[] {
    this.broken = true;
    this.held = Buffer.alloc(0);
    out.push({ kind: 'oversized' });
    return out;
  }
}

// ------------------------------------------------------------------ answers

export type Answer =
  | { kind: 'return'; value: unknown }
  /** `desc` is already bounded and sanitised. */
  | { kind: 'error'; errorClass: string; desc: string }
  | { kind: 'invalid'; why: string };

/** One answer line. Total: anything but `{"return": …}` or `{"error": {…}}` alone is `invalid`. */
export function parseAnswer(line: string): Answer {
  let msg: unknown;
  try {
    msg = JSON.parse(line);
  } catch {
    return { kind: 'invalid', why: 'not JSON' };
  }
  if (!isPlainObject(msg)) return { kind: 'invalid', why: 'not a JSON object' };
  const keys = Object.keys(msg);
  if (keys.length === 1 && keys[0] === 'return') return { kind: 'return', value: msg.return };
  if (keys.length === 1 && keys[0] === 'error' && isPlainObject(msg.error)) {
    const e = msg.error;
    return {
      kind: 'error',
      errorClass: typeof e.class === 'string' ? guestText(e.class, 40) : 'unknown',
      desc: typeof e.desc === 'string' ? guestText(e.desc) : '',
    };
  }
  return { kind: 'invalid', why: 'neither a return nor an error' };
}

/** The delimited sync answered with our id. */
export function isSyncAnswer(value: unknown, id: number): boolean {
  return typeof value === 'number' && value === id;
}

/** `{}`: what commands without a result return. */
export function isEmptyReturn(value: unknown): boolean {
  return isPlainObject(value) && Object.keys(value).length === 0;
}

/** guest-file-open's handle: a non-negative integer. */
export function fileHandleOf(value: unknown): number | undefined {
  return typeof value === 'number' && Number.isSafeInteger(value) && value >= 0 ? value : undefined;
}

/** guest-file-write's count of bytes written. */
export function writtenCountOf(value: unknown): number | undefined {
  if (!isPlainObject(value)) return undefined;
  const c = value.count;
  return typeof c === 'number' && Number.isSafeInteger(c) && c >= 0 ? c : undefined;
}

/** guest-file-read's bytes (at most `max`; more, or a count that disagrees with them, is a lie). */
export function readBytesOf(value: unknown, max: number): { data: Buffer; eof: boolean } | undefined {
  if (!isPlainObject(value)) return undefined;
  const { count, eof } = value;
  const b64 = value['buf-b64'];
  if (typeof count !== 'number' || !Number.isSafeInteger(count) || count < 0 || count > max) return undefined;
  if (typeof eof !== 'boolean') return undefined;
  if (count === 0 && b64 === undefined) return { data: Buffer.alloc(0), eof };
  if (typeof b64 !== 'string' || b64.length > Math.ceil(max / 3) * 4 + 4) return undefined;
  const data = Buffer.from(b64, 'base64');
  if (data.length !== count || data.toString('base64') !== b64) return undefined;
  return { data, eof };
}

/**
 * Guest-supplied text made fit for an error message or a log line: printable
 * ASCII only (anything else becomes `?`), at most `max` characters.
 */
export function guestText(text: string, max = 120): string {
  // eslint-disable-next-line no-control-regex
  const clean = text.slice(0, max + 1).replace(/[^\x20-\x7e]/g, '?');
  return clean.length > max ? `${clean.slice(0, max)}…` : clean;
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
