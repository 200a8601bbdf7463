#!/usr/bin/env node
/**
 * `paygress`: the consumer's face. Sends spawn/stop/status as encrypted DMs to
 * a provider and prints the reply naming the request.
 *
 * The root password never goes on the command line (argv is world-readable in
 * /proc): it comes from $PAYGRESS_ROOT_PASSWORD, from stdin with
 * --password-stdin, or is generated and printed.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { ConsumerClient, NoReplyError, type ReplyMessage } from '../client/consumer.js';
import { loadOrCreateKeyFile, npubOf, parsePublicKey, pubkeyOf } from '../nostr/keys.js';

const USAGE = `usage:
  paygress keygen                         make (or show) your key; prints your npub
  paygress spawn  --provider NPUB --relay URL [--plan ID] [--isolation LEVEL]
                  [--ssh-key-file FILE] [--password-stdin] [--wait-ready]
  paygress stop   --provider NPUB --relay URL WORKLOAD_ID
  paygress status --provider NPUB --relay URL WORKLOAD_ID

common options:
  --key FILE      your key file (default ~/.config/paygress/consumer.nsec, made 0600 if missing)
  --relay URL     a relay the provider listens on (repeatable)
  --nip04         use NIP-04 DMs instead of NIP-17 gift wraps
  --timeout SECS  how long to wait for the reply (default 60; 300 with --wait-ready)
  --json          print the reply as JSON

The root password is read from $PAYGRESS_ROOT_PASSWORD or stdin (--password-stdin);
if neither is given a random one is generated and printed.

exit codes: 0 ok, 2 the provider answered with an error, 3 no reply in time, 64 usage
`;

const EXIT = { ok: 0, error_reply: 2, timeout: 3, usage: 64 } as const;

function defaultKeyPath(): string {
  return join(process.env.XDG_CONFIG_HOME ?? join(homedir(), '.config'), 'paygress', 'consumer.nsec');
}

function readPassword(fromStdin: boolean): { password: string; generated: boolean } {
  if (fromStdin) return { password: readFileSync(0, 'utf8').replace(/\r?\n$/, ''), generated: false };
  const env = process.env.PAYGRESS_ROOT_PASSWORD;
  if (env) return { password: env, generated: false };
  return { password: randomBytes(15).toString('base64url'), generated: true };
}

function printReply(r: ReplyMessage, json: boolean): void {
  if (json) {
    process.stdout.write(`${JSON.stringify(r)}\n`);
    return;
  }
  switch (r.type) {
    case 'access_details':
      process.stdout.write(
        `workload ${r.workload_id} (${r.isolation_level}) until ${r.expires_at}\n` +
          `  ssh -p ${r.ssh_port} ${r.ssh_user}@${r.host}\n`,
      );
      break;
    case 'ready':
      process.stdout.write(`workload ${r.workload_id} is ready for SSH\n`);
      break;
    case 'boot_failed':
      process.stdout.write(`workload ${r.workload_id} failed to boot: ${r.message}\n`);
      break;
    case 'stopped':
      process.stdout.write(`workload ${r.workload_id} stopped\n`);
      break;
    case 'status':
      process.stdout.write(
        `workload ${r.workload_id}: ${r.state}, ssh -p ${r.ssh_port} root@${r.host}, ${r.seconds_left} s left (until ${r.expires_at})\n`,
      );
      break;
    case 'error':
      process.stderr.write(`error ${r.code}: ${r.message}\n`);
      break;
    default:
      process.stdout.write(`${JSON.stringify(r)}\n`);
  }
}

async function main(argv: string[]): Promise<number> {
  const { positionals, values } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      key: { type: 'string', default: defaultKeyPath() },
      provider: { type: 'string' },
      relay: { type: 'string', multiple: true },
      plan: { type: 'string' },
      isolation: { type: 'string' },
      'ssh-key-file': { type: 'string', multiple: true },
      'password-stdin': { type: 'boolean' },
      'wait-ready': { type: 'boolean' },
      nip04: { type: 'boolean' },
      timeout: { type: 'string' },
      json: { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  const [command, arg] = positionals;
  if (values.help || !command) {
    process.stdout.write(USAGE);
    return values.help ? EXIT.ok : EXIT.usage;
  }

  const sk = await loadOrCreateKeyFile(values.key, { create: true });
  if (command === 'keygen') {
    process.stdout.write(values.json ? `${JSON.stringify({ npub: npubOf(sk), pubkey: pubkeyOf(sk), key_file: values.key })}\n` : `${npubOf(sk)}\n`);
    return EXIT.ok;
  }
  if (!['spawn', 'stop', 'status'].includes(command)) {
    process.stderr.write(`unknown command ${command}\n${USAGE}`);
    return EXIT.usage;
  }
  if (!values.provider || !values.relay?.length) {
    process.stderr.write(`--provider and at least one --relay are required\n`);
    return EXIT.usage;
  }
  if (command !== 'spawn' && !arg) {
    process.stderr.write(`${command} needs a workload id\n`);
    return EXIT.usage;
  }

  let request: Record<string, unknown>;
  let generatedPassword: string | undefined;
  if (command === 'spawn') {
    const { password, generated } = readPassword(values['password-stdin'] ?? false);
    if (generated) generatedPassword = password;
    request = { type: 'spawn', version: 1, root_password: password };
    if (values.plan) request.plan = values.plan;
    if (values.isolation) request.isolation = values.isolation;
    const keys = (values['ssh-key-file'] ?? []).map((f) => readFileSync(f, 'utf8').trim());
    if (keys.length) request.ssh_keys = keys;
  } else {
    request = { type: command, version: 1, workload_id: arg };
  }

  const waitReady = command === 'spawn' && (values['wait-ready'] ?? false);
  const timeoutMs = Number(values.timeout ?? (waitReady ? 300 : 60)) * 1000;
  const client = new ConsumerClient({
    sk,
    provider: parsePublicKey(values.provider),
    relays: values.relay,
    channel: values.nip04 ? 'nip04' : 'nip17',
  });
  const tty = process.stderr.isTTY && !values.json;
  const started = Date.now();
  try {
    await client.start();
    if (tty) process.stderr.write(`sent ${command}; waiting for the provider…\n`);
    const final = await client.request(request, {
      timeoutMs,
      done: waitReady ? (r) => r.type === 'ready' || r.type === 'boot_failed' : undefined,
      onProgress: (r) => {
        if (r.type === 'access_details' && generatedPassword && !values.json) process.stdout.write(`root password: ${generatedPassword}\n`);
        printReply(generatedPassword && values.json && r.type === 'access_details' ? { ...r, root_password: generatedPassword } : r, values.json ?? false);
        if (tty) process.stderr.write(`  (${((Date.now() - started) / 1000).toFixed(1)} s)\n`);
      },
    });
    return final.type === 'error' || final.type === 'boot_failed' ? EXIT.error_reply : EXIT.ok;
  } catch (err) {
    if (err instanceof NoReplyError) {
      process.stderr.write(`${err.message}: is the provider online and listening on ${values.relay.join(', ')}?\n`);
      return EXIT.timeout;
    }
    throw err;
  } finally {
    await client.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`paygress: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  },
);
