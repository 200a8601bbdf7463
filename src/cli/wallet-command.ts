/**
 * `paygress-agent wallet balance|withdraw`: the operator's view of the
 * provider's Cashu wallet. Safe while the service runs: both go through the
 * wallet's single-writer lock and read its files afresh.
 */
import { statSync } from 'node:fs';
import { join } from 'node:path';
import type { Config } from '../config/schema.js';
import { readKeyFile } from '../nostr/keys.js';
import { createPayments } from '../payment/index.js';
import { PaymentError } from '../payment/types.js';
import { silentLogger } from '../util/logger.js';

export const WALLET_USAGE = `usage: paygress-agent wallet balance [--json]
       paygress-agent wallet withdraw [--mint URL] [--amount N] [--unit sat|msat] [--json]
       paygress-agent wallet restore [--json]

  balance   what the provider's wallet holds, per mint and unit
  withdraw  a Cashu token of N (all if omitted) from the wallet, printed on
            stdout; it is written to <stateDir>/wallet/withdrawals/ before
            its proofs leave the wallet. --mint may be left out when the
            wallet holds money at one mint only.
  restore   after losing <stateDir>/wallet/ (not the provider key): ask each
            whitelisted mint for the outputs derived from the wallet seed
            (NUT-09) and put the unspent ones back.
`;

export interface WalletArgs {
  action: string | undefined;
  mint?: string;
  amount?: string;
  unit?: string;
  json?: boolean;
}

/** Runs the command; returns the exit code (64 on a usage error). */
export async function walletCommand(cfg: Config, args: WalletArgs, out: NodeJS.WritableStream, err: NodeJS.WritableStream): Promise<number> {
  if (args.action !== 'balance' && args.action !== 'withdraw' && args.action !== 'restore') {
    err.write(WALLET_USAGE);
    return 64;
  }
  if (args.unit !== undefined && args.unit !== 'sat' && args.unit !== 'msat') {
    err.write('paygress-agent wallet: --unit must be sat or msat\n');
    return 64;
  }
  let amount: number | undefined;
  if (args.amount !== undefined) {
    amount = /^[1-9][0-9]{0,15}$/.test(args.amount) ? Number(args.amount) : Number.NaN;
    if (!Number.isSafeInteger(amount)) {
      err.write('paygress-agent wallet: --amount must be a positive whole number\n');
      return 64;
    }
  }
  const sk = await readKeyFile(cfg.provider.keyFile);
  becomeStateDirOwner(cfg.stateDir);
  const payments = createPayments({ stateDir: cfg.stateDir, providerSecretKey: sk, config: cfg.payment, logger: silentLogger });
  try {
    if (args.action === 'restore') {
      if (cfg.payment.whitelistedMints.length === 0) {
        err.write('paygress-agent wallet: payment.whitelistedMints is empty; nothing to restore from\n');
        return 1;
      }
      const found = await payments.restoreFromSeed();
      if (args.json) out.write(`${JSON.stringify(found)}\n`);
      else if (found.length === 0) out.write('nothing to restore\n');
      else for (const f of found) out.write(`restored ${f.amount} ${f.unit}\t${f.mint}\n`);
      return 0;
    }
    const balances = await payments.balance();
    if (args.action === 'balance') {
      if (args.json) out.write(`${JSON.stringify(balances)}\n`);
      else if (balances.length === 0) out.write('the wallet is empty\n');
      else for (const b of balances) out.write(`${b.amount} ${b.unit}\t${b.mint}\n`);
      return 0;
    }
    const mints = [...new Set(balances.map((b) => b.mint))];
    const mint = args.mint ?? (mints.length === 1 ? mints[0] : undefined);
    if (!mint) {
      err.write(mints.length === 0 ? 'paygress-agent wallet: the wallet is empty\n' : `paygress-agent wallet: the wallet holds money at several mints; pick one with --mint:\n${mints.join('\n')}\n`);
      return mints.length === 0 ? 1 : 64;
    }
    const token = await payments.withdraw(mint, amount, args.unit as 'sat' | 'msat' | undefined);
    if (args.json) out.write(`${JSON.stringify({ mint, token })}\n`);
    else {
      err.write(`withdrawn; the token is also kept in ${join(cfg.stateDir, 'wallet', 'withdrawals')}/\n`);
      out.write(`${token}\n`);
    }
    return 0;
  } catch (e) {
    if (e instanceof PaymentError) {
      err.write(`paygress-agent wallet: ${e.message} (${e.code})\n`);
      return 1;
    }
    throw e;
  }
}

/**
 * Root runs the command as the owner of the state folder (after reading the
 * key, which root may read): files it writes must stay readable by the
 * service user, never become root's.
 */
function becomeStateDirOwner(stateDir: string): void {
  if (process.getuid?.() !== 0) return;
  let owner;
  try {
    owner = statSync(stateDir);
  } catch {
    return;
  }
  if (owner.uid === 0) return;
  process.setgroups!([owner.gid]);
  process.setgid!(owner.gid);
  process.setuid!(owner.uid);
}
