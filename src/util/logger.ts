import { AsyncLocalStorage } from 'node:async_hooks';
import { pino, type Logger } from 'pino';
import { prettyStream } from './log-pretty.js';

export type { Logger };

/**
 * Paths pino must censor wherever they appear. Secrets should never reach a log
 * call in the first place; this is the second line of defence.
 */
const SECRET_KEYS = [
  'password', 'rootPassword', 'root_password', 'ssh_password', 'secretKey', 'sk', 'nsec',
  'content', 'cashu_token', 'token', 'refund_token', 'refundToken',
];
/** Each secret key at the top level and up to two objects deep. */
export const REDACT_PATHS = SECRET_KEYS.flatMap((k) => [k, `*.${k}`, `*.*.${k}`]);

/**
 * Fields every log line written inside a request's async context carries
 * (requestId, then workloadId once it exists), whichever logger writes it:
 * the driver and the outbox log through their own loggers, and the driver
 * contract has no room for a logger, so the context travels with the call.
 */
const logContext = new AsyncLocalStorage<Record<string, unknown>>();

/** Run `fn` with `fields` on every log line it (and whatever it starts) writes. */
export function withLogContext<T>(fields: Record<string, unknown>, fn: () => T): T {
  return logContext.run({ ...logContext.getStore(), ...fields }, fn);
}

/** Add fields to the current context (e.g. the workload id once it is chosen); no-op outside one. */
export function addLogContext(fields: Record<string, unknown>): void {
  const store = logContext.getStore();
  if (store) Object.assign(store, fields);
}

function contextMixin(_obj: object, _level: number, logger: Logger): object {
  const store = logContext.getStore();
  if (!store) return {};
  // A child logger may already bind the same key; never write it twice in one line.
  const bound = logger.bindings();
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(store)) if (!(k in bound)) out[k] = v;
  return out;
}

/** JSON lines on stdout (for journald); pretty lines when stdout is a terminal, unless `pretty` says otherwise. */
export function createLogger(opts: { level?: string; name?: string; pretty?: boolean } = {}): Logger {
  const pretty = opts.pretty ?? (process.stdout.isTTY === true && process.env.LOG_FORMAT !== 'json');
  return pino(
    {
      name: opts.name ?? 'paygress-agent',
      level: opts.level ?? process.env.LOG_LEVEL ?? 'info',
      redact: { paths: REDACT_PATHS, censor: '[redacted]' },
      mixin: contextMixin,
    },
    pretty ? prettyStream(process.stdout) : undefined,
  );
}

/** A logger that drops everything; for tests and library callers that pass none. */
export const silentLogger: Logger = pino({ level: 'silent' });
