#!/usr/bin/env node
/**
 * `paygress`: the consumer's face. Sends spawn/stop/status as encrypted DMs to
 * a provider and prints the reply naming the request.
 *
 * The root password never goes on the command line (argv is world-readable in
 * /proc): it comes from $PAYGRESS_ROOT_PASSWORD, from stdin with
 * --password-stdin, or is generated and printed. A Cashu token is money, so
 * the same holds for it: --token-file or --token-stdin, never argv.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { ConsumerClient, NoReplyError, type ReplyMessage } from '../client/consumer.js';
import { loadOrCreateKeyFile, npubOf, parsePublicKey, parseSecretKey, pubkeyOf } from '../nostr/keys.js';
import { fetchDirectory, type ProviderEntry } from '../discovery/directory.js';

const USAGE = `usage:
  paygress keygen                         make (or show) your key; prints your npub
  paygress list   --relay URL             providers from offers and heartbeats (online = heartbeat
                                          within 3 minutes), their tiers, plans and free capacity
  paygress spawn  --provider NPUB --relay URL [--plan ID] [--isolation LEVEL]
                  [--ssh-key-file FILE] [--password-stdin] [--wait-ready]
                  [--token-file FILE | --token-stdin]
  paygress topup  --provider NPUB --relay URL WORKLOAD_ID (--token-file FILE | --token-stdin)
  paygress stop   --provider NPUB --relay URL WORKLOAD_ID
  paygress status --provider NPUB --relay URL WORKLOAD_ID

common options:
  --key FILE      your key file holding an nsec or 64 hex (default ~/.config/paygress/consumer.nsec,
                  made 0600 if missing); $PAYGRESS_NSEC (nsec or hex) overrides it. Never put a
                  secret key on the command line. --provider takes an npub or 64 hex.
  --relay URL     a relay the provider listens on (repeatable)
  --nip04         use NIP-04 DMs instead of NIP-17 gift wraps
  --timeout SECS  how long to wait for the reply (default 60; 300 with --wait-ready)
  --json          print the reply as JSON

The root password is read from $PAYGRESS_ROOT_PASSWORD or stdin (--password-stdin);
if neither is given a random one is generated and printed.

Paying: a provider in paid mode takes a Cashu token (cashuA…/cashuB…) from one of the
mints its offer lists (paygress list). The lease lasts what the token buys at the plan's
rate, up to the provider's maximum; whatever is not used (above the maximum, or all of
it when the spawn fails) comes back as a refund token, printed on its own line:
  refund token (N sat): cashuB…
Redeem it in your wallet. With --json it is the reply's refund_token field.

On a terminal, a progress line on stderr shows the phase (sending → sent → access details
→ ready) and the time elapsed; --json prints one JSON object per line on stdout and no progress.

exit codes: 0 ok, 1 unexpected failure (bad key, no relay reachable), 2 the provider answered
with an error (or the VM failed to boot), 3 no reply in time, 64 usage
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

function readToken(file: string | undefined, fromStdin: boolean): string | undefined {
  const text = fromStdin ? readFileSync(0, 'utf8') : file ? readFileSync(file, 'utf8') : undefined;
  return text?.trim();
}

/** Money in a reply: shown whatever the reply's type, the refund token on a line of its own so it can be copied whole. */
function printMoney(r: ReplyMessage): void {
  if (typeof r.paid_msats === 'number') process.stdout.write(`paid ${formatMsats(r.paid_msats)}\n`);
  if (typeof r.refund_token === 'string' && r.refund_token) {
    process.stdout.write(`refund token (${formatMsats(Number(r.refund_msats ?? 0))}): ${r.refund_token}\n`);
  } else if (typeof r.refund_msats === 'number' && r.refund_msats > 0) {
    process.stdout.write(`refund of ${formatMsats(r.refund_msats)} owed; the provider sends it in a later reply\n`);
  }
}

function formatMsats(msats: number): string {
  return msats % 1000 === 0 ? `${msats / 1000} sat` : `${msats} msat`;
}

function printReply(r: ReplyMessage, json: boolean): void {
  if (json) {
    process.stdout.write(`${JSON.stringify(r)}\n`);
    return;
  }
  printMoney(r);
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
    case 'topped_up':
      process.stdout.write(`workload ${r.workload_id} extended by ${r.extended_seconds} s, until ${r.expires_at}\n`);
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
      'token-file': { type: 'string' },
      'token-stdin': { type: 'boolean' },
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

  if (command === 'list') return list(values.relay ?? [], values.json ?? false, Number(values.timeout ?? 8) * 1000);
  const sk = process.env.PAYGRESS_NSEC ? parseSecretKey(process.env.PAYGRESS_NSEC) : await loadOrCreateKeyFile(values.key, { create: true });
  if (command === 'keygen') {
    process.stdout.write(values.json ? `${JSON.stringify({ npub: npubOf(sk), pubkey: pubkeyOf(sk), key_file: values.key })}\n` : `${npubOf(sk)}\n`);
    return EXIT.ok;
  }
  if (!['spawn', 'stop', 'status', 'topup'].includes(command)) {
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
  if (values['token-stdin'] && (values['token-file'] || values['password-stdin'])) {
    process.stderr.write('--token-stdin cannot be combined with --token-file or --password-stdin (stdin is read once)\n');
    return EXIT.usage;
  }
  const token = readToken(values['token-file'], values['token-stdin'] ?? false);
  if (command === 'topup' && !token) {
    process.stderr.write('topup needs a token: --token-file FILE or --token-stdin\n');
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
    if (token) request.cashu_token = token;
  } else if (command === 'topup') {
    request = { type: 'topup', version: 1, workload_id: arg, cashu_token: token };
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
  const progress = process.stderr.isTTY && !values.json ? new Progress(command) : undefined;
  try {
    await client.start();
    progress?.phase('sending');
    const final = await client.request(request, {
      timeoutMs,
      done: waitReady ? (r) => r.type === 'ready' || r.type === 'boot_failed' : undefined,
      onSent: () => progress?.phase('sent, waiting for the provider'),
      onProgress: (r) => {
        progress?.clear();
        if (r.type === 'access_details' && generatedPassword && !values.json) process.stdout.write(`root password: ${generatedPassword}\n`);
        printReply(generatedPassword && values.json && r.type === 'access_details' ? { ...r, root_password: generatedPassword } : r, values.json ?? false);
        if (r.type === 'access_details' && waitReady) progress?.phase('access details received, waiting for the VM to boot');
        else progress?.done(r.type);
      },
    });
    return final.type === 'error' || final.type === 'boot_failed' ? EXIT.error_reply : EXIT.ok;
  } catch (err) {
    if (err instanceof NoReplyError) {
      progress?.stop();
      process.stderr.write(`${err.message}: is the provider online and listening on ${values.relay.join(', ')}?\n`);
      return EXIT.timeout;
    }
    throw err;
  } finally {
    progress?.stop();
    await client.close();
  }
}

/** One self-rewriting stderr line: what we wait for and for how long. Terminals only. */
class Progress {
  private readonly started = Date.now();
  private current = '';
  private readonly timer: NodeJS.Timeout;

  constructor(private readonly command: string) {
    this.timer = setInterval(() => this.draw(), 250);
    this.timer.unref();
  }

  private elapsed(): string {
    return `${((Date.now() - this.started) / 1000).toFixed(1)} s`;
  }

  private draw(): void {
    if (this.current) process.stderr.write(`\r\x1b[K${this.command}: ${this.current} (${this.elapsed()})`);
  }

  phase(text: string): void {
    this.current = text;
    this.draw();
  }

  /** Erase the line so a reply prints cleanly; the next draw puts it back. */
  clear(): void {
    if (this.current) process.stderr.write('\r\x1b[K');
  }

  /** A final reply arrived: leave a one-line record of how long it took. */
  done(what: string): void {
    this.current = '';
    process.stderr.write(`${this.command}: ${what} after ${this.elapsed()}\n`);
  }

  stop(): void {
    clearInterval(this.timer);
    this.clear();
    this.current = '';
  }
}

async function list(relays: string[], json: boolean, timeoutMs: number): Promise<number> {
  if (!relays.length) {
    process.stderr.write('list needs at least one --relay\n');
    return EXIT.usage;
  }
  const providers = await fetchDirectory(relays, { timeoutMs });
  if (json) {
    process.stdout.write(`${JSON.stringify(providers)}\n`);
    return EXIT.ok;
  }
  if (!providers.length) process.stdout.write(`no providers found on ${relays.join(', ')}\n`);
  for (const p of providers) process.stdout.write(describeProvider(p));
  return EXIT.ok;
}

function describeProvider(p: ProviderEntry): string {
  const seen = p.last_seen === null ? 'no heartbeat seen' : `last heartbeat ${Math.max(0, Math.floor(Date.now() / 1000) - p.last_seen)} s ago`;
  const cap = p.available_capacity;
  const lines = [
    `${p.online ? 'online ' : 'offline'} ${p.npub}  ${p.name ?? '(no offer)'}${p.location ? ` (${p.location})` : ''}`,
    `  isolation: ${p.isolation_level ?? '?'}  ${seen}${p.active_workloads === null ? '' : `, ${p.active_workloads} running`}`,
  ];
  if (cap) lines.push(`  free: ${cap.cpu_available / 1000} vCPU, ${cap.memory_mb_available} MB RAM, ${cap.storage_gb_available} GB disk`);
  for (const s of p.specs) {
    lines.push(`  plan ${s.id}: ${s.name}, ${s.cpu_millicores / 1000} vCPU, ${s.memory_mb} MB${s.rate_msats_per_sec ? `, ${s.rate_msats_per_sec} msat/s` : ''}`);
  }
  return `${lines.join('\n')}\n`;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`paygress: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  },
);
