/**
 * A tiny pretty printer for pino's JSON lines, used when stdout is a
 * terminal (journald and pipes get the JSON untouched). Pure: one JSON line
 * in, one human line out. No dependency on pino-pretty.
 */

const LEVELS: Record<number, [string, string]> = {
  10: ['TRACE', '\x1b[90m'],
  20: ['DEBUG', '\x1b[36m'],
  30: ['INFO ', '\x1b[32m'],
  40: ['WARN ', '\x1b[33m'],
  50: ['ERROR', '\x1b[31m'],
  60: ['FATAL', '\x1b[35m'],
};
const RESET = '\x1b[0m';
const DIM = '\x1b[2m';
/** Shown first, in this order, because they say whose line it is. */
const FIRST = ['requestId', 'workloadId', 'phase', 'ms'];
const DROP = new Set(['level', 'time', 'msg', 'pid', 'hostname', 'name', 'v']);

function value(v: unknown): string {
  if (typeof v === 'string') return /^[^\s"=]*$/.test(v) && v !== '' ? v : JSON.stringify(v);
  return JSON.stringify(v) ?? String(v);
}

function clock(t: unknown): string {
  const d = typeof t === 'number' ? new Date(t) : new Date();
  return d.toISOString().slice(11, 23);
}

/** Format one pino JSON line (without its newline). Lines that are not JSON objects pass through. */
export function prettyLine(line: string, color = true): string {
  let o: Record<string, unknown>;
  try {
    const parsed: unknown = JSON.parse(line);
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) return line;
    o = parsed as Record<string, unknown>;
  } catch {
    return line;
  }
  const [label, tint] = LEVELS[Number(o.level)] ?? [String(o.level ?? '?').toUpperCase().padEnd(5), ''];
  const keys = [...FIRST.filter((k) => k in o), ...Object.keys(o).filter((k) => !DROP.has(k) && !FIRST.includes(k))];
  const fields = keys.map((k) => `${k}=${value(o[k])}`).join(' ');
  const c = (code: string, s: string) => (color && code ? `${code}${s}${RESET}` : s);
  return `${c(DIM, clock(o.time))} ${c(tint, label)} ${String(o.msg ?? '')}${fields ? ` ${c(DIM, fields)}` : ''}`;
}

/** A pino destination that pretty-prints each line to `out`. */
export function prettyStream(out: NodeJS.WritableStream, color = true): { write(chunk: string): void } {
  return {
    write(chunk: string) {
      for (const line of chunk.split('\n')) if (line) out.write(`${prettyLine(line, color)}\n`);
    },
  };
}
