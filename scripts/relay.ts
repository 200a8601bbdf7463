/**
 * `npm run relay [-- --port N]`: a local Nostr relay for the demo and manual tests.
 * In-memory: events are lost when it exits.
 */
import { startRelay } from '../test/support/relay.js';

function parsePort(argv: string[]): number {
  const i = argv.findIndex((a) => a === '--port' || a.startsWith('--port='));
  if (i < 0) return 7777;
  const arg = argv[i]!;
  const raw = arg.includes('=') ? arg.slice(arg.indexOf('=') + 1) : argv[i + 1];
  const port = Number(raw);
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    console.error(`relay: --port wants an integer 1-65535, got ${JSON.stringify(raw ?? '')}`);
    process.exit(2);
  }
  return port;
}

const relay = await startRelay({ port: parsePort(process.argv.slice(2)) });
console.log(`relay listening on ${relay.url}`);

let stopping = false;
const shutdown = (signal: string): void => {
  if (stopping) return;
  stopping = true;
  console.log(`relay: ${signal}, stopping (${relay.eventCount()} events dropped)`);
  relay.stop().then(() => process.exit(0), () => process.exit(1));
};
process.on('SIGINT', () => shutdown('SIGINT'));
process.on('SIGTERM', () => shutdown('SIGTERM'));
