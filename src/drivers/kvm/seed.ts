/**
 * Writes the NoCloud seed ISO. user-data/meta-data exist on disk only for the
 * moment genisoimage reads them, in a 0700 subdirectory, as 0600 files; they
 * carry the password hash, never the plaintext.
 */
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import type { SeedFiles } from './cloud-config.js';

export async function writeSeedIso(opts: { dir: string; isoTool: string; files: SeedFiles; output: string }): Promise<void> {
  // mkdtemp creates the directory 0700.
  const tmp = await mkdtemp(path.join(opts.dir, '.seed-'));
  try {
    await writeFile(path.join(tmp, 'user-data'), opts.files.userData, { mode: 0o600, flag: 'wx' });
    await writeFile(path.join(tmp, 'meta-data'), opts.files.metaData, { mode: 0o600, flag: 'wx' });
    const names = ['user-data', 'meta-data'];
    if (opts.files.networkConfig !== undefined) {
      await writeFile(path.join(tmp, 'network-config'), opts.files.networkConfig, { mode: 0o600, flag: 'wx' });
      names.push('network-config');
    }
    await execa(
      opts.isoTool,
      ['-quiet', '-output', opts.output, '-volid', 'cidata', '-joliet', '-rock', ...names],
      { cwd: tmp, stdin: 'ignore', stdout: 'ignore', stderr: 'pipe' },
    );
    await chmod(opts.output, 0o600);
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}
