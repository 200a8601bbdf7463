/**
 * A provider wallet in a process of its own, for crash tests: redeems the
 * token read from stdin under the ref given, then prints the result. The test
 * kills it with SIGKILL at the moment the mint has done the swap.
 * argv: stateDir seedHex mintUrl ref
 */
import { hexToBytes } from '@noble/hashes/utils.js';
import { CashuPayments } from '../../src/payment/wallet.js';
import { silentLogger } from '../../src/util/logger.js';

const [stateDir, seedHex, mintUrl, ref] = process.argv.slice(2);
const chunks: Buffer[] = [];
for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
const payments = new CashuPayments({ stateDir: stateDir!, seed: hexToBytes(seedHex!), whitelistedMints: [mintUrl!], logger: silentLogger });
const received = await payments.redeem(Buffer.concat(chunks).toString('utf8').trim(), ref!);
process.stdout.write(`${JSON.stringify(received)}\n`);
