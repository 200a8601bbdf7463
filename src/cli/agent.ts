#!/usr/bin/env node
/**
 * `paygress-agent`: the operator's face. `run` starts the service (systemd
 * runs this) after the blocking doctor checks; `doctor` runs every check and
 * prints a table. Both exit 78 (EX_CONFIG) on a bad config or a blocker.
 */
import { parseArgs } from 'node:util';
import { loadConfig, ConfigError } from '../config/load.js';
import { hasBlocker, renderTable, runChecks } from '../doctor/index.js';
import { startService } from '../service/service.js';
import { isNetAction, runNetCommand } from '../hostnet/command.js';
import { createLogger } from '../util/logger.js';

const USAGE = `usage: paygress-agent run|doctor|net up|down|status [--config /etc/paygress-agent/provider.json] [--json]

  run      check the host (as doctor, without relays), then listen on the
           configured relays and serve spawn/stop/status DMs
  doctor   check KVM, qemu, the base image, the key file, directories, the
           port range, each relay and the public host; print a table with a
           fix for each problem. Exit 0 when nothing blocks, 78 otherwise.
           --json prints the rows as JSON instead.
  net      (root, install time; systemd/paygress-agent-net.service) with
           drivers.kvm.network "tap": up = create the taps, turn forwarding
           on, load the nftables table; down = remove them; status = check.

  --config  also PAYGRESS_CONFIG; the key file path can be overridden with
            PAYGRESS_KEY_FILE
`;

/** 78 = EX_CONFIG: systemd shows it as a configuration failure. */
const EX_CONFIG = 78;

async function main(argv: string[]): Promise<number> {
  const { positionals, values } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      config: { type: 'string', short: 'c', default: process.env.PAYGRESS_CONFIG ?? '/etc/paygress-agent/provider.json' },
      help: { type: 'boolean', short: 'h' },
      json: { type: 'boolean' },
    },
  });
  const command = positionals[0];
  if (command === 'net' && !values.help && isNetAction(positionals[1])) {
    return runNetCommand(positionals[1], loadConfig(values.config).drivers.kvm, (line) => process.stdout.write(`${line}\n`));
  }
  if (values.help || (command !== 'run' && command !== 'doctor')) {
    process.stderr.write(USAGE);
    return values.help ? 0 : 64;
  }
  const cfg = loadConfig(values.config);
  if (command === 'doctor') {
    const rows = await runChecks(cfg, { mode: 'doctor' });
    process.stdout.write(values.json ? `${JSON.stringify(rows, null, 2)}\n` : renderTable(rows));
    return hasBlocker(rows) ? EX_CONFIG : 0;
  }
  const logger = createLogger({ level: cfg.logLevel });
  // The blocking checks first: a host that cannot serve should fail here,
  // loudly and with the fix, not at the first consumer's spawn.
  const rows = await runChecks(cfg, { mode: 'run' });
  for (const r of rows) if (r.status === 'warn') logger.warn({ check: r.name, fix: r.fix }, r.detail);
  if (hasBlocker(rows)) {
    const blockers = rows.filter((r) => r.status === 'fail');
    for (const r of blockers) logger.error({ check: r.name, fix: r.fix }, r.detail);
    process.stderr.write(`paygress-agent: not starting, ${blockers.length} blocking check(s) failed:\n${renderTable(blockers)}`);
    return EX_CONFIG;
  }
  const service = await startService(cfg, logger);
  await new Promise<void>((resolve) => {
    const stop = (signal: string) => {
      logger.info({ signal }, 'stopping');
      resolve();
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
  await service.stop();
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    const known = err instanceof ConfigError || (err instanceof Error && /^(Key(File|Format)Error|BaseImageError)$/.test(err.name));
    process.stderr.write(`paygress-agent: ${known ? (err as Error).message : (err as Error)?.stack ?? String(err)}\n`);
    process.exit(known ? EX_CONFIG : 1);
  },
);
