/**
 * The doctor's result type and its rendering as a table. Pure.
 */

/** `fail` is a blocker: the agent cannot serve (or would serve wrongly) until it is fixed. */
export type CheckStatus = 'ok' | 'warn' | 'fail';

export interface CheckResult {
  /** Short name of what was checked, e.g. `key file`, `relay wss://…`. */
  name: string;
  status: CheckStatus;
  /** What was found. */
  detail: string;
  /** What to do about it; set for every warn and fail. */
  fix?: string;
}

export function hasBlocker(results: readonly CheckResult[]): boolean {
  return results.some((r) => r.status === 'fail');
}

const LABEL: Record<CheckStatus, string> = { ok: 'ok', warn: 'WARN', fail: 'FAIL' };

/**
 * One row per check, `fix:` on an indented line under each warn/fail, and a
 * closing summary line. Wraps nothing: terminals and journald both cope with
 * long lines better than with a broken-up fix command.
 */
export function renderTable(results: readonly CheckResult[]): string {
  const nameW = Math.max(5, ...results.map((r) => r.name.length));
  const lines = [`${'STATUS'.padEnd(6)}  ${'CHECK'.padEnd(nameW)}  RESULT`];
  for (const r of results) {
    lines.push(`${LABEL[r.status].padEnd(6)}  ${r.name.padEnd(nameW)}  ${r.detail}`);
    if (r.fix && r.status !== 'ok') lines.push(`${' '.repeat(6)}  ${' '.repeat(nameW)}  fix: ${r.fix}`);
  }
  const count = (s: CheckStatus) => results.filter((r) => r.status === s).length;
  const fails = count('fail');
  lines.push('');
  lines.push(
    `${count('ok')} ok, ${count('warn')} warning${count('warn') === 1 ? '' : 's'}, ${fails} blocker${fails === 1 ? '' : 's'}` +
      (fails ? ': the agent will not start until the FAIL rows are fixed' : ''),
  );
  return `${lines.join('\n')}\n`;
}
