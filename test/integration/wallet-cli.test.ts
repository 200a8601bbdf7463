/**
 * `paygress-agent wallet balance|withdraw` as an operator runs it: the real
 * CLI in a child process, against a wallet another process (standing in for
 * the running service) uses at the same time. Test mint on port 47410.
 */
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { generateSecretKey } from 'nostr-tools';
import { nsecEncode } from 'nostr-tools/nip19';
import { getEncodedToken, Wallet } from '@cashu/cashu-ts';
import { createPayments } from '../../src/payment/index.js';
import { silentLogger } from '../../src/util/logger.js';
import { TestMint } from '../support/mint.js';

const CLI = new URL('../../src/cli/agent.ts', import.meta.url).pathname;
const mint = new TestMint({ port: 47410 });

beforeAll(() => mint.start());
afterAll(() => mint.stop());

async function consumerToken(amount: number): Promise<string> {
  const wallet = new Wallet(mint.url, { unit: 'sat' });
  await wallet.loadMint();
  const proofs = await wallet.mintProofsBolt11(amount, await wallet.createMintQuoteBolt11(amount));
  return getEncodedToken({ mint: mint.url, unit: 'sat', proofs });
}

function providerSetup(): { configPath: string; stateDir: string; sk: Uint8Array } {
  const root = mkdtempSync(join(tmpdir(), 'wallet-cli-'));
  const sk = generateSecretKey();
  const keyFile = join(root, 'provider.nsec');
  writeFileSync(keyFile, `${nsecEncode(sk)}\n`, { mode: 0o600 });
  const stateDir = join(root, 'state');
  const cfg = JSON.parse(readFileSync(new URL('../../config/provider.example.json', import.meta.url), 'utf8'));
  cfg.provider.keyFile = keyFile;
  cfg.stateDir = stateDir;
  cfg.payment = { whitelistedMints: [mint.url] };
  delete cfg.admission.allowlistFile;
  const configPath = join(root, 'provider.json');
  writeFileSync(configPath, JSON.stringify(cfg));
  return { configPath, stateDir, sk };
}

function cli(configPath: string, ...args: string[]) {
  return execa('node', ['--import', 'tsx', CLI, 'wallet', ...args, '--config', configPath], { reject: false });
}

describe('paygress-agent wallet', () => {
  it('shows the balance and withdraws a token another wallet redeems, while the service holds the same wallet', async () => {
    const { configPath, stateDir, sk } = providerSetup();
    const service = createPayments({ stateDir, providerSecretKey: sk, config: { whitelistedMints: [mint.url] }, logger: silentLogger });
    await service.redeem(await consumerToken(64), 'a'.repeat(64));

    const balance = await cli(configPath, 'balance', '--json');
    expect(balance.exitCode).toBe(0);
    expect(JSON.parse(balance.stdout)).toEqual([{ mint: mint.url, unit: 'sat', amount: 64 }]);

    // The service is busy with the wallet: the CLI waits for the lock instead of writing beside it.
    let released = 0;
    let cliDone = 0;
    const hold = service.store.lock(async () => {
      await new Promise((resolve) => setTimeout(resolve, 1500));
      released = performance.now();
    });
    const withdraw = cli(configPath, 'withdraw', '--amount', '40').then((r) => ((cliDone = performance.now()), r));
    await hold;
    const result = await withdraw;
    expect(result.exitCode).toBe(0);
    expect(cliDone).toBeGreaterThan(released);
    const token = result.stdout.trim();
    expect(token).toMatch(/^cashuB/);
    expect(readdirSync(join(stateDir, 'wallet', 'withdrawals'))).toHaveLength(1);

    expect(await service.balance()).toEqual([{ mint: mint.url, unit: 'sat', amount: 24 }]);
    const other = new Wallet(mint.url, { unit: 'sat' });
    await other.loadMint();
    const proofs = await other.receive(token);
    expect(proofs.reduce((s, p) => s + Number(p.amount.toString()), 0)).toBe(40);
  });

  it('says what is wrong: usage, empty wallet', async () => {
    const { configPath } = providerSetup();
    expect((await cli(configPath, 'balance')).stdout).toContain('the wallet is empty');
    const empty = await cli(configPath, 'withdraw');
    expect(empty.exitCode).toBe(1);
    expect(empty.stderr).toContain('the wallet is empty');
    expect((await cli(configPath, 'withdraw', '--amount', '0')).exitCode).toBe(64);
    expect((await cli(configPath, 'withdraw', '--amount', '1.5')).exitCode).toBe(64);
    expect((await cli(configPath, 'spend')).exitCode).toBe(64);
  });
});
