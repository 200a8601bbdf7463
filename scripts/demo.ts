/**
 * The whole promise in one command: a local relay, the agent, a consumer.
 * Spawns a VM by encrypted DM, prints the access details, waits until the
 * guest is ready, logs in over SSH as root with the password sent in the DM,
 * runs a command, and stops the VM.
 *
 *   npm run demo              # real cloud-init guest (built once, cached)
 *   npm run demo -- --tiny    # tiny busybox guest: no SSH login, ~10 s
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
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

const tiny = process.argv.includes('--tiny');
const say = (s: string) => process.stdout.write(`\x1b[1m» ${s}\x1b[0m\n`);

async function main(): Promise<void> {
  say(`preparing the ${tiny ? 'tiny busybox' : 'Debian cloud-init'} guest image (cached after the first run)`);
  const guest = tiny ? await ensureTinyGuest() : await ensureCloudGuest();
  const root = mkdtempSync(join(tmpdir(), 'paygress-demo-'));
  const relay = await startRelay();
  say(`local relay on ${relay.url}`);

  const providerSk = generateSecretKey();
  writeFileSync(join(root, 'provider.nsec'), `${nsecEncode(providerSk)}\n`, { mode: 0o600 });
  const cfg = parseConfig(
    {
      provider: { keyFile: 'provider.nsec', publicHost: '127.0.0.1', name: 'demo provider' },
      relays: [relay.url],
      stateDir: 'state',
      logLevel: process.env.LOG_LEVEL ?? 'warn',
      tiers: [{ level: 'dedicated-host', driver: 'kvm' }],
      plans: [{ id: 'demo', name: 'Demo', description: 'demo VM', vcpus: 2, memoryMb: tiny ? 256 : 1024, diskGb: 4, durationSeconds: 900 }],
      defaultPlan: 'demo',
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
    },
    { baseDir: root },
  );
  const service = await startService(cfg, createLogger({ level: cfg.logLevel }));
  say(`agent listening as provider ${service.pubkey.slice(0, 16)}…`);

  const consumer = new ConsumerClient({ sk: generateSecretKey(), provider: service.pubkey, relays: [relay.url] });
  await consumer.start();
  const password = `demo pässword: ${Math.random().toString(36).slice(2)} #1`;
  const started = Date.now();
  const secs = () => `${((Date.now() - started) / 1000).toFixed(1)} s`;
  let id: string | undefined;
  let stoppedOk = false;
  let ticker: NodeJS.Timeout | undefined;
  try {
    say('consumer sends a spawn DM (NIP-17 gift wrap) carrying the root password');
    ticker = tiny
      ? undefined
      : setInterval(() => process.stdout.write(`  … guest booting under TCG (${secs()})\n`), 15_000);
    let access: ReplyMessage | undefined;
    const final = await consumer.request(
      { type: 'spawn', version: 1, root_password: password },
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

    say('consumer sends a stop DM');
    const stopped = await consumer.request({ type: 'stop', version: 1, workload_id: access.workload_id }, { timeoutMs: 60_000 });
    say(`reply after ${secs()}: ${JSON.stringify(stopped)}`);
    stoppedOk = stopped.type === 'stopped';
  } finally {
    clearInterval(ticker);
    // The agent leaves VMs running when it stops (by design); the demo must not.
    if (id && !stoppedOk) await consumer.request({ type: 'stop', workload_id: id }, { timeoutMs: 60_000 }).catch(() => undefined);
    await consumer.close();
    await service.stop();
    await relay.stop();
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
