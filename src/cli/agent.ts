#!/usr/bin/env node
/**
 * `paygress-agent`: the operator's face. `run` starts the service (systemd
 * runs this) after the blocking doctor checks; `doctor` runs every check and
 * prints a table. Both exit 78 (EX_CONFIG) on a bad config or a blocker.
 */
import { parseArgs } from 'node:util';
import { loadConfig, ConfigError } from '../config/load.js';
import { hasBlocker, renderTable, runChecks } from '../doctor/index.js';
import type { Config } from '../config/schema.js';
import { startService, type RunningService } from '../service/service.js';
import { createLogger, type Logger } from '../util/logger.js';
import { walletCommand, WALLET_USAGE } from './wallet-command.js';

import { isNetAction, runNetCommand } from '../hostnet/command.js';

const USAGE = `usage: paygress-agent run|doctor|wallet|net up|down|status [--config /etc/paygress-agent/provider.json] [--json]

  run      check the host (as doctor, without relays), then listen on the
           configured relays and serve spawn/stop/status DMs. Refuses to run
           as root (qemu would run as root too) unless --allow-root is given.
           SIGHUP re-reads the config: plans, limits, admission, relays and logLevel
           apply at once; other changed fields are reported and need a restart
  doctor   check KVM, qemu, the base image, the key file, directories, the
           port range, each relay and the public host; print a table with a
           fix for each problem. Exit 0 when nothing blocks, 78 otherwise.
           --json prints the rows as JSON instead.
  net      (root, install time; systemd/paygress-agent-net.service) with
           drivers.kvm.network "tap": up = create the taps, turn forwarding
           on, load the nftables table; down = remove them; status = check.

  wallet   balance | withdraw | restore: the provider's Cashu wallet (works while
           the service runs); see \`paygress-agent wallet --help\`

  --config  also PAYGRESS_CONFIG; the key file path can be overridden with
            PAYGRESS_KEY_FILE
`;

/** 78 = EX_CONFIG: systemd shows it as a configuration failure. */
const EX_CONFIG = 78;
/** sysexits EX_SOFTWARE: an internal error (a bug), not the host or the config. */
const EX_SOFTWARE = 70;

async function main(argv: string[]): Promise<number> {
  const { positionals, values } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      config: { type: 'string', short: 'c', default: process.env.PAYGRESS_CONFIG ?? '/etc/paygress-agent/provider.json' },
      help: { type: 'boolean', short: 'h' },
      json: { type: 'boolean' },
      'allow-root': { type: 'boolean' },
      mint: { type: 'string' },
      amount: { type: 'string' },
      unit: { type: 'string' },
    },
  });
  const command = positionals[0];
  if (command === 'net' && !values.help && isNetAction(positionals[1])) {
    return runNetCommand(positionals[1], loadConfig(values.config).drivers.kvm, (line) => process.stdout.write(`${line}\n`));
  }
  if (command === 'wallet' && (values.help || !positionals[1])) {
    process.stderr.write(WALLET_USAGE);
    return values.help ? 0 : 64;
  }
  if (values.help || (command !== 'run' && command !== 'doctor' && command !== 'wallet')) {
    process.stderr.write(USAGE);
    return values.help ? 0 : 64;
  }
  if (command === 'run' && process.getuid?.() === 0 && !values['allow-root']) {
    process.stderr.write(
      'paygress-agent: refusing to run as root: every VM\'s qemu would run as root too, and a guest escape would own the host.\n' +
        '  Run it as the service user (the systemd unit does: User=paygress), or pass --allow-root for a throwaway test machine.\n',
    );
    return EX_CONFIG;
  }
  const cfg = loadConfig(values.config);
  if (command === 'wallet') {
    const { mint, amount, unit, json } = values;
    return walletCommand(cfg, { action: positionals[1], mint, amount, unit, json }, process.stdout, process.stderr);
  }
  if (command === 'doctor') {
    const rows = await runChecks(cfg, { mode: 'doctor' });
    process.stdout.write(values.json ? `${JSON.stringify(rows, null, 2)}\n` : renderTable(rows));
    return hasBlocker(rows) ? EX_CONFIG : 0;
  }
  const logger = createLogger({ level: cfg.logLevel });
  // SIGHUP's default action ends the process: hold it from here, even before the service is up.
  let reload: () => void = () => logger.warn('SIGHUP while starting: ignored; send it again once the agent listens');
  process.on('SIGHUP', () => reload());
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
  // A throw no handler caught is a bug: the state it left is unknown, so the
  // process ends (EX_SOFTWARE) with one logged line and systemd restarts it;
  // VMs outlive the restart and are re-adopted. Input from outside never gets
  // here: every path that takes it has its own handler (README, Resilience).
  const fatal = (kind: string) => (err: unknown) => {
    logger.fatal({ err: err instanceof Error ? err.stack ?? err.message : String(err) }, `${kind}: exiting`);
    process.exit(EX_SOFTWARE);
  };
  process.on('uncaughtException', fatal('uncaught exception'));
  process.on('unhandledRejection', fatal('unhandled rejection'));
  const service = await startService(cfg, logger);
  reload = () => reloadConfig(service, values.config, logger);
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

/** SIGHUP: re-read the file; a bad one leaves the running config as it is and says which field is wrong. */
function reloadConfig(service: RunningService, path: string, logger: Logger): void {
  let next: Config;
  try {
    next = loadConfig(path);
  } catch (err) {
    const why = (err as Error).message.split('\n').map((l) => l.trim()).filter(Boolean).join(' ');
    logger.error({ config: path }, `config reload refused, keeping the running config: ${why}`);
    return;
  }
  try {
    const { live, needsRestart } = service.reload(next);
    logger.info({ config: path, applied: live }, live.length ? `config reloaded: ${live.join(', ')}` : 'config reloaded: nothing to apply');
    if (needsRestart.length) {
      logger.warn({ config: path, fields: needsRestart }, `config reload: ${needsRestart.join(', ')} changed but needs a restart; kept as running`);
    }
  } catch (err) {
    logger.error({ config: path, err: (err as Error).message }, 'config reload failed part way; restart the agent to be sure of its config');
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    const known = err instanceof ConfigError || (err instanceof Error && /^(Key(File|Format)Error|BaseImageError)$/.test(err.name));
    process.stderr.write(`paygress-agent: ${known ? (err as Error).message : (err as Error)?.stack ?? String(err)}\n`);
    process.exit(known ? EX_CONFIG : 1);
  },
);
