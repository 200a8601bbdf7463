/**
 * The wallet's single-writer lock file: a full disk or a crash between
 * creating the lock and writing its pid must not leave the wallet locked.
 */
import { mkdtempSync, utimesSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { WalletStore } from '../../src/payment/store.js';
import { mountTmpfs, type Tmpfs } from '../support/tmpfs.js';

describe('wallet lock', () => {
  let fs: Tmpfs | undefined;
  afterEach(() => {
    fs?.unmount();
    fs = undefined;
  });

  it('an empty lock file a crash left behind is taken over', async () => {
    const stateDir = mkdtempSync(join(tmpdir(), 'wallet-lock-'));
    const store = new WalletStore(stateDir);
    const lock = join(stateDir, 'wallet', 'lock');
    writeFileSync(lock, '');
    const old = new Date(Date.now() - 60_000);
    utimesSync(lock, old, old);
    // Before: waited the 60 s a held lock gets, then refused ('the wallet is busy').
    await expect(store.lock(async () => 'ran')).resolves.toBe('ran');
    expect(existsSync(lock)).toBe(false);
  });

  it('on a full disk the lock fails at once and leaves no lock behind; with space back it works', async () => {
    fs = mountTmpfs(512);
    const store = new WalletStore(fs.dir);
    fs.fill();
    await expect(store.lock(async () => 'ran')).rejects.toThrow(/ENOSPC/);
    expect(existsSync(join(fs.dir, 'wallet', 'lock'))).toBe(false);
    fs.free();
    await expect(store.lock(async () => 'ran')).resolves.toBe('ran');
  });
});
