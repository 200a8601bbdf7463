/**
 * Runs the real agent CLI (`paygress-agent run`) as a child process against a
 * config written for the test, so tests see exactly what systemd would run.
 */
import { execa, type ResultPromise } from 'execa';
import { mkdtempSync, readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { generateSecretKey, getPublicKey } from 'nostr-tools';
import { nsecEncode } from 'nostr-tools/nip19';

const AGENT_CLI = new URL('../../src/cli/agent.ts', import.meta.url).pathname;
/** The CLI as `npm run build` (tsc) emits it; what an installed package runs. */
export const COMPILED_AGENT_CLI = new URL('../../dist/src/cli/agent.js', import.meta.url).pathname;

export interface GuestPaths {
  kernel?: string;
  initrd?: string;
  append?: string;
  baseImage: string;
  /** `ssh-banner` for guests without cloud-init (the tiny test guest). */
  readiness?: 'cloud-init' | 'ssh-banner';
}

export interface AgentProcessOptions {
  relays: string[];
  guest: GuestPaths;
  portRange: { from: number; to: number };
  /** Reuse a state folder (and key) to restart "the same" agent. */
  root?: string;
  sk?: Uint8Array;
  /** Deep-merged over the generated config. */
  overrides?: Record<string, unknown>;
  /**
   * Run the compiled CLI (COMPILED_AGENT_CLI, after `npm run build`) with plain
   * `node` instead of the TypeScript source under tsx: no loader in the process,
   * as in production (the bench measures memory this way).
   */
  compiled?: boolean;
  /** How long to wait for `agent listening`. Default 20000. */
  startTimeoutMs?: number;
  /** Run the agent inside this network namespace (`ip netns exec`, which execs: the pid stays the agent's). */
  netns?: string;
}

/** The node flags the systemd unit starts the agent with: a compiled test agent runs as production does. */
export function unitNodeFlags(): string[] {
  const unit = readFileSync(new URL('../../systemd/paygress-agent.service', import.meta.url), 'utf8');
  const args = /^ExecStart=\S+\s+(.*)$/m.exec(unit)?.[1]?.split(/\s+/) ?? [];
  const script = args.findIndex((a) => a.endsWith('/agent.js'));
  return script > 0 ? args.slice(0, script) : [];
}

export interface AgentProcess {
  pubkey: string;
  sk: Uint8Array;
  root: string;
  vmRoot: string;
  stateDir: string;
  configPath: string;
  proc: ResultPromise;
  /** Everything the agent wrote to stdout/stderr so far. */
  output(): string;
  /** Resolves when a log line matching `re` appears. */
  waitForLog(re: RegExp, timeoutMs?: number): Promise<string>;
  /** SIGTERM and wait for exit. */
  stop(): Promise<void>;
  /** SIGKILL (a crash). */
  kill(): Promise<void>;
}

function merge(base: Record<string, any>, over: Record<string, any>): Record<string, any> {
  for (const [k, v] of Object.entries(over)) {
    base[k] = v && typeof v === 'object' && !Array.isArray(v) && typeof base[k] === 'object' ? merge(base[k], v) : v;
  }
  return base;
}

export async function startAgentProcess(opts: AgentProcessOptions): Promise<AgentProcess> {
  const root = opts.root ?? mkdtempSync(join(tmpdir(), 'pga-agent-'));
  const sk = opts.sk ?? generateSecretKey();
  const keyFile = join(root, 'provider.nsec');
  writeFileSync(keyFile, `${nsecEncode(sk)}\n`, { mode: 0o600 });
  const stateDir = join(root, 'state');
  const vmRoot = join(root, 'vms');
  mkdirSync(stateDir, { recursive: true, mode: 0o700 });
  const config = merge(
    {
      provider: { keyFile, publicHost: '127.0.0.1', name: 'test provider' },
      relays: opts.relays,
      stateDir,
      logLevel: 'debug',
      tiers: [{ level: 'dedicated-host', driver: 'kvm' }],
      plans: [
        { id: 'tiny', name: 'Tiny', description: 'test plan', vcpus: 1, memoryMb: 256, diskGb: 2, durationSeconds: 3600 },
        { id: 'cloud', name: 'Cloud', description: 'cloud-init guest', vcpus: 2, memoryMb: 1024, diskGb: 4, durationSeconds: 3600 },
      ],
      defaultPlan: 'tiny',
      // Tests send bursts from one key and hold many VMs; the limits tests set their own.
      limits: {
        ratePerMinute: 6000,
        rateBurst: 1000,
        // Bursts of hundreds (hostile corpus) must get their own answers, not `busy`; the flood test sets its own.
        maxQueuedRequests: 10_000,
        maxVmsPerSender: 20,
        maxVms: 40,
        maxSpawnsInFlight: 16,
        // Tiny guests: the derived capacity (cores × 4 vCPUs) would refuse a burst of 10.
        hostCapacity: { vcpus: 64, memoryMb: 32_768 },
      },
      drivers: {
        kvm: {
          accel: 'tcg',
          vmRoot,
          overlayTemplateDir: join(root, 'overlay-templates'),
          baseImage: opts.guest.baseImage,
          ...(opts.guest.kernel ? { kernel: opts.guest.kernel } : {}),
          ...(opts.guest.initrd ? { initrd: opts.guest.initrd } : {}),
          ...(opts.guest.append ? { append: opts.guest.append } : {}),
          readiness: opts.guest.readiness ?? 'cloud-init',
          bindAddress: '127.0.0.1',
          portRange: opts.portRange,
          pidfileTimeoutMs: 20_000,
          stopTimeoutMs: 5_000,
        },
      },
    },
    opts.overrides ?? {},
  );
  const configPath = join(root, 'provider.json');
  writeFileSync(configPath, JSON.stringify(config, null, 2));

  let out = '';
  const waiters = new Set<() => void>();
  const cli = opts.compiled ? [...unitNodeFlags(), COMPILED_AGENT_CLI] : ['--import', 'tsx', AGENT_CLI];
  // Tests run as root here; the agent refuses that without the flag.
  const command = ['node', ...cli, 'run', '--allow-root', '--config', configPath];
  if (opts.netns) command.unshift('ip', 'netns', 'exec', opts.netns);
  const proc = execa(command[0]!, command.slice(1), {
    reject: false,
    stdin: 'ignore',
    all: true,
    env: { LOG_LEVEL: 'debug' },
  });
  proc.all?.on('data', (chunk: Buffer) => {
    out += chunk.toString();
    for (const w of waiters) w();
  });

  const waitForLog = (re: RegExp, timeoutMs = 20_000) =>
    new Promise<string>((resolve, reject) => {
      const check = () => {
        const m = out.split('\n').find((l) => re.test(l));
        if (m) {
          waiters.delete(check);
          clearTimeout(timer);
          resolve(m);
        }
      };
      const timer = setTimeout(() => {
        waiters.delete(check);
        reject(new Error(`agent log never matched ${re} within ${timeoutMs} ms; output:\n${out.slice(-4000)}`));
      }, timeoutMs);
      waiters.add(check);
      check();
    });

  const agent: AgentProcess = {
    pubkey: getPublicKey(sk),
    sk,
    root,
    vmRoot,
    stateDir,
    configPath,
    proc,
    output: () => out,
    waitForLog,
    async stop() {
      proc.kill('SIGTERM');
      await proc;
    },
    async kill() {
      proc.kill('SIGKILL');
      await proc;
    },
  };
  await waitForLog(/agent listening/, opts.startTimeoutMs);
  return agent;
}
