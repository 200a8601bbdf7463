import { pino, type Logger } from 'pino';

export type { Logger };

/**
 * Paths pino must censor wherever they appear. Secrets should never reach a log
 * call in the first place; this is the second line of defence.
 */
export const REDACT_PATHS = [
  'password', '*.password', 'rootPassword', '*.rootPassword', 'root_password', '*.root_password',
  'ssh_password', '*.ssh_password', 'secretKey', '*.secretKey', 'sk', '*.sk', 'nsec', '*.nsec',
  'content', '*.content', 'cashu_token', '*.cashu_token', 'token', '*.token',
];

export function createLogger(opts: { level?: string; name?: string } = {}): Logger {
  return pino({
    name: opts.name ?? 'paygress-agent',
    level: opts.level ?? process.env.LOG_LEVEL ?? 'info',
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
  });
}

/** A logger that drops everything; for tests and library callers that pass none. */
export const silentLogger: Logger = pino({ level: 'silent' });
