/**
 * The doctor's warm-pool image check against real images: the cloud test
 * guest (one ext4 on the whole disk, qemu-ga inside), and small qcow2 images
 * made here with and without qemu-ga, whole-disk, behind an MBR and behind a
 * GPT, and one with no ext filesystem at all.
 */
import { mkdirSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkGuestAgentImage } from '../../src/doctor/guest-agent-image.js';
import { ensureCloudGuest } from '../support/cloud-guest.js';
import { gptHead, mbrHead } from '../support/disk-images.js';

let dir: string;
const POOLED = [{ id: 'small', warmPool: 2 }];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'pga-doctor-ga-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A qcow2 whose ext4 (holding `files`) starts at `offset` behind `head` (a partition table), or fills the disk. */
async function image(name: string, files: string[], layout: 'whole' | 'mbr' | 'gpt' | 'no-fs'): Promise<string> {
  const root = join(dir, `${name}-root`);
  for (const f of files) {
    mkdirSync(join(root, f, '..'), { recursive: true });
    writeFileSync(join(root, f), '#!/bin/sh\n', { mode: 0o755 });
  }
  mkdirSync(join(root, 'etc'), { recursive: true });
  const raw = join(dir, `${name}.raw`);
  const offsetLba = layout === 'whole' ? 0 : 2048;
  const fsSectors = 32 * 2048;
  await execa('truncate', ['-s', `${(offsetLba + fsSectors + 2048) * 512}`, raw]);
  if (layout !== 'no-fs') {
    await execa('mkfs.ext4', ['-q', '-F', '-E', `offset=${offsetLba * 512}`, '-d', root, raw, '32M']);
  }
  if (layout === 'mbr' || layout === 'gpt') {
    // The EFI partition of stock images (no ext4 there) comes before the root in the GPT case.
    const head = layout === 'mbr' ? mbrHead(offsetLba, fsSectors) : gptHead([offsetLba + fsSectors, offsetLba]);
    const fd = openSync(raw, 'r+');
    writeSync(fd, head, 0, head.length, 0);
    closeSync(fd);
  }
  const qcow2 = join(dir, `${name}.qcow2`);
  await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
  rmSync(raw);
  return qcow2;
}

const kvm = (baseImage: string) => ({ baseImage, baseImageFormat: 'qcow2' as const, qemuImgBinary: 'qemu-img' });

describe('doctor: qemu-ga in the guest image', () => {
  it('no row without a warm pool', async () => {
    expect(await checkGuestAgentImage(kvm('/nonexistent.qcow2'), [{ id: 'a' }, { id: 'b', warmPool: 0 }])).toBeUndefined();
  });

  it('the cloud test guest has it', async () => {
    const cloud = await ensureCloudGuest();
    const row = await checkGuestAgentImage(kvm(cloud.baseImage), POOLED);
    expect(row, JSON.stringify(row)).toMatchObject({ status: 'ok' });
    expect(row!.detail).toContain('/usr/sbin/qemu-ga');
    expect(row!.detail).toContain('small');
  }, 120_000);

  it.each([
    ['whole', '/usr/sbin/qemu-ga'],
    ['mbr', '/usr/sbin/qemu-ga'],
    ['gpt', '/usr/bin/qemu-ga'],
  ] as const)('found in a %s image (%s)', async (layout, file) => {
    const row = await checkGuestAgentImage(kvm(await image(`with-${layout}`, [file], layout)), POOLED);
    expect(row, JSON.stringify(row)).toMatchObject({ status: 'ok' });
    expect(row!.detail).toContain(file);
  }, 60_000);

  it.each(['whole', 'mbr', 'gpt'] as const)('missing from a %s image: fail, with the fix', async (layout) => {
    const row = await checkGuestAgentImage(kvm(await image(`without-${layout}`, ['usr/sbin/sshd'], layout)), POOLED);
    expect(row, JSON.stringify(row)).toMatchObject({ status: 'fail' });
    expect(row!.fix).toContain('qemu-guest-agent');
  }, 60_000);

  it('no ext filesystem to look into: a warning that says what it cannot see', async () => {
    const row = await checkGuestAgentImage(kvm(await image('nofs', [], 'no-fs')), POOLED);
    expect(row, JSON.stringify(row)).toMatchObject({ status: 'warn' });
    expect(row!.detail).toMatch(/no ext2\/3\/4 filesystem/);
  }, 60_000);

  it('an unreadable image: a warning, never a throw', async () => {
    const row = await checkGuestAgentImage(kvm(join(dir, 'missing.qcow2')), POOLED);
    expect(row).toMatchObject({ status: 'warn' });
  });
});
