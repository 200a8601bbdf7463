/**
 * The whole promise in one command: a local relay, the agent, a consumer.
 * Spawns a VM by encrypted DM, prints the access details, waits until the
 * guest is ready, logs in over SSH as root with the password sent in the DM,
 * runs a command, and stops the VM.
 *
 *   npm run demo              # real cloud-init guest (built once, cached)
 *   npm run demo -- --tiny    # tiny busybox guest: no SSH login, ~10 s
 *   npm run demo -- --paid    # the provider charges: a local test mint, a
 *                             # consumer Cashu wallet pays, tops up, gets its
 *                             # refund; the operator withdraws the earnings
 *                             # (combine with --tiny for a quick run)
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { getEncodedToken, Wallet } from '@cashu/cashu-ts';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { generateSecretKey } from 'nostr-tools';
import { nsecEncode } from 'nostr-tools/nip19';
import { ConsumerClient, type ReplyMessage } from '../src/client/consumer.js';
import { parseConfig } from '../src/config/load.js';
import { startService } from '../src/service/service.js';
import { createLogger } from '../src/util/logger.js';
import { startRelay } from '../test/support/relay.js';
import { ensureTinyGuest } from '../test/support/tiny-guest.js';
import { ensureCloudGuest } from '../test/support/cloud-guest.js';
import { TestMint } from '../test/support/mint.js';

const tiny = process.argv.includes('--tiny');
const paid = process.argv.includes('--paid');
const AGENT_CLI = new URL('../src/cli/agent.ts', import.meta.url).pathname;
/** The demo plan's price: 100 msat a second, 6 sat a minute. */
const RATE_MSATS_PER_SEC = 100;

/** The consumer's Cashu wallet: tokens in, tokens out, at the demo mint. */
class ConsumerWallet {
  private balanceSat = 0;
  private proofs: Awaited<ReturnType<Wallet['mintProofsBolt11']>> = [];
  private constructor(
    private readonly wallet: Wallet,
    private readonly mintUrl: string,
  ) {}

  static async open(mintUrl: string): Promise<ConsumerWallet> {
    const wallet = new Wallet(mintUrl, { unit: 'sat' });
    await wallet.loadMint();
    return new ConsumerWallet(wallet, mintUrl);
  }

  /** Buys sats at the mint (the test mint marks every Lightning invoice paid). */
  async fund(sat: number): Promise<void> {
    const quote = await this.wallet.createMintQuoteBolt11(sat);
    this.proofs.push(...(await this.wallet.mintProofsBolt11(sat, quote)));
    this.balanceSat += sat;
  }

  /** A token of `sat` to hand over; the rest stays in the wallet. */
  async pay(sat: number): Promise<string> {
    const { keep, send } = await this.wallet.send(sat, this.proofs);
    this.proofs = keep;
    this.balanceSat -= sat;
    return getEncodedToken({ mint: this.mintUrl, unit: 'sat', proofs: send });
  }

  async receive(token: string): Promise<number> {
    const proofs = await this.wallet.receive(token);
    const got = proofs.reduce((s, p) => s + Number(p.amount.toString()), 0);
    this.proofs.push(...proofs);
    this.balanceSat += got;
    return got;
  }

  get balance(): number {
    return this.balanceSat;
  }
}
const say = (s: string) => process.stdout.write(`\x1b[1m» ${s}\x1b[0m\n`);

async function main(): Promise<void> {
  say(`preparing the ${tiny ? 'tiny busybox' : 'Debian cloud-init'} guest image (cached after the first run)`);
  const guest = tiny ? await ensureTinyGuest() : await ensureCloudGuest();
  const root = mkdtempSync(join(tmpdir(), 'paygress-demo-'));
  const relay = await startRelay();
  say(`local relay on ${relay.url}`);
  const mint = paid ? new TestMint() : undefined;
  if (mint) say(`local Cashu test mint on ${await mint.start()} (real Cashu cryptography; Lightning is simulated)`);

  const providerSk = generateSecretKey();
  writeFileSync(join(root, 'provider.nsec'), `${nsecEncode(providerSk)}\n`, { mode: 0o600 });
  const rawConfig = {
      provider: { keyFile: 'provider.nsec', publicHost: '127.0.0.1', name: 'demo provider' },
      relays: [relay.url],
      stateDir: 'state',
      logLevel: process.env.LOG_LEVEL ?? 'warn',
      tiers: [{ level: 'dedicated-host', driver: 'kvm' }],
      plans: [
        { id: 'demo', name: 'Demo', description: 'demo VM', vcpus: 2, memoryMb: tiny ? 256 : 1024, diskGb: 4, durationSeconds: 900, rateMsatsPerSec: paid ? RATE_MSATS_PER_SEC : 0 },
      ],
      defaultPlan: 'demo',
      ...(mint
        ? { admission: { mode: 'paid', minimumDurationSeconds: 60, maxLeaseSeconds: 3600 }, payment: { whitelistedMints: [mint.url] } }
        : {}),
      drivers: {
        kvm: {
          // This machine's /dev/kvm cannot boot stock kernels; production uses `auto`.
          accel: 'tcg',
          vmRoot: 'vms',
          overlayTemplateDir: 'overlay-templates',
          baseImage: guest.baseImage,
          kernel: guest.kernel,
          initrd: guest.initrd,
          ...(guest.append ? { append: guest.append } : {}),
          readiness: tiny ? 'ssh-banner' : 'cloud-init',
          // Under TCG a cloud-init boot takes 60-120 s on an idle 2-core host, longer on a busy one.
          readyTimeoutMs: 600_000,
          bindAddress: '127.0.0.1',
          portRange: { from: 44000, to: 44099 },
        },
      },
    };
  // Also on disk: the operator's `paygress-agent wallet` commands read it.
  const configPath = join(root, 'provider.json');
  writeFileSync(configPath, JSON.stringify(rawConfig, null, 2));
  const cfg = parseConfig(rawConfig, { baseDir: root });
  const service = await startService(cfg, createLogger({ level: cfg.logLevel }));
  say(`agent listening as provider ${service.pubkey.slice(0, 16)}…`);

  const consumer = new ConsumerClient({ sk: generateSecretKey(), provider: service.pubkey, relays: [relay.url] });
  await consumer.start();
  const wallet = mint ? await ConsumerWallet.open(mint.url) : undefined;
  if (wallet) {
    await wallet.fund(500);
    say(`the consumer's Cashu wallet holds ${wallet.balance} sat; the plan costs ${RATE_MSATS_PER_SEC} msat/s (${(RATE_MSATS_PER_SEC * 60) / 1000} sat a minute)`);
  }
  const password = `demo pässword: ${Math.random().toString(36).slice(2)} #1`;
  const started = Date.now();
  const secs = () => `${((Date.now() - started) / 1000).toFixed(1)} s`;
  let id: string | undefined;
  let stoppedOk = false;
  let ticker: NodeJS.Timeout | undefined;
  try {
    const spawnToken = wallet ? await wallet.pay(60) : undefined;
    say(`consumer sends a spawn DM (NIP-17 gift wrap) carrying the root password${spawnToken ? ' and a 60 sat Cashu token (10 minutes)' : ''}`);
    ticker = tiny
      ? undefined
      : setInterval(() => process.stdout.write(`  … guest booting under TCG (${secs()})\n`), 15_000);
    let access: ReplyMessage | undefined;
    const final = await consumer.request(
      { type: 'spawn', version: 1, root_password: password, ...(spawnToken ? { cashu_token: spawnToken } : {}) },
      {
        timeoutMs: 660_000,
        done: (r) => tiny || r.type === 'ready' || r.type === 'boot_failed',
        onProgress: (r) => {
          if (r.type === 'access_details') {
            access = r;
            id = r.workload_id as string; // from here on, a failure must stop this VM
          }
          say(`reply after ${secs()}: ${JSON.stringify(r, null, 2)}`);
        },
      },
    );
    clearInterval(ticker);
    if (!access || final.type === 'error' || final.type === 'boot_failed') throw new Error(`spawn failed: ${JSON.stringify(final)}`);

    if (!tiny) {
      say(`ssh -p ${access.ssh_port} root@${access.host} (password from the DM)`);
      const ssh = await execa(
        'sshpass',
        ['-e', 'ssh', '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR',
          '-p', String(access.ssh_port), `root@${access.host}`, 'echo "logged in as $(whoami) on $(hostname)"; uname -r'],
        { env: { SSHPASS: password }, reject: false },
      );
      process.stdout.write(`${ssh.stdout}\n${ssh.stderr}`);
      if (ssh.exitCode !== 0) throw new Error('SSH login failed');
    }

    if (wallet) {
      // 400 sat would buy 66 min; the lease may run 60 min at most from now, so the rest comes back.
      say('consumer tops up with 400 sat: more than the 1 h maximum lease allows, so the surplus comes back');
      const topped = await consumer.request({ type: 'topup', version: 1, workload_id: access.workload_id, cashu_token: await wallet.pay(400) }, { timeoutMs: 60_000 });
      say(`reply after ${secs()}: ${JSON.stringify({ ...topped, refund_token: topped.refund_token ? `${String(topped.refund_token).slice(0, 24)}…` : undefined }, null, 2)}`);
      if (topped.type !== 'topped_up') throw new Error(`top-up failed: ${JSON.stringify(topped)}`);
      if (typeof topped.refund_token === 'string') say(`the consumer's wallet redeems the refund: ${await wallet.receive(topped.refund_token)} sat back; it now holds ${wallet.balance} sat`);
    }

    say('consumer sends a stop DM');
    const stopped = await consumer.request({ type: 'stop', version: 1, workload_id: access.workload_id }, { timeoutMs: 60_000 });
    say(`reply after ${secs()}: ${JSON.stringify(stopped)}`);
    stoppedOk = stopped.type === 'stopped';

    if (mint) {
      const cli = (...args: string[]) => execa('node', ['--import', 'tsx', AGENT_CLI, 'wallet', ...args, '--config', configPath], { env: { LOG_LEVEL: 'silent' } });
      say('operator: paygress-agent wallet balance');
      process.stdout.write(`${(await cli('balance')).stdout}\n`);
      say('operator: paygress-agent wallet withdraw (prints a Cashu token)');
      const token = (await cli('withdraw')).stdout.trim();
      process.stdout.write(`${token.slice(0, 40)}…\n`);
      const operator = await ConsumerWallet.open(mint.url);
      say(`the operator's own wallet redeems it: ${await operator.receive(token)} sat earned`);
    }
  } finally {
    clearInterval(ticker);
    // The agent leaves VMs running when it stops (by design); the demo must not.
    if (id && !stoppedOk) await consumer.request({ type: 'stop', workload_id: id }, { timeoutMs: 60_000 }).catch(() => undefined);
    await consumer.close();
    await service.stop();
    await relay.stop();
    await mint?.stop();
    rmSync(root, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    process.stderr.write(`demo failed: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  },
);
