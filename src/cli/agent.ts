#!/usr/bin/env node
/**
 * `paygress-agent`: the operator's face. `run` starts the service (systemd
 * runs this); it exits non-zero with a clear message on a bad config or key.
 */
import { parseArgs } from 'node:util';
import { loadConfig, ConfigError } from '../config/load.js';
import { startService } from '../service/service.js';
import { createLogger } from '../util/logger.js';

const USAGE = `usage: paygress-agent run [--config /etc/paygress-agent/provider.json]

  run      listen on the configured relays and serve spawn/stop/status DMs
`;

async function main(argv: string[]): Promise<number> {
  const { positionals, values } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      config: { type: 'string', short: 'c', default: process.env.PAYGRESS_CONFIG ?? '/etc/paygress-agent/provider.json' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  const command = positionals[0];
  if (values.help || command !== 'run') {
    process.stderr.write(USAGE);
    return values.help ? 0 : 64;
  }
  const cfg = loadConfig(values.config);
  const logger = createLogger({ level: cfg.logLevel });
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
    process.exit(known ? 78 : 1); // 78 = EX_CONFIG: systemd shows it as a configuration failure
  },
);
