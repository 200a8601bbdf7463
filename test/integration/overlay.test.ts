/**
 * Overlay templates against the real qemu-img: a copied template must be the
 * very file `qemu-img create` makes for the workload, and a valid qcow2 that
 * backs onto the base image.
 */
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { OverlayError, OverlayTemplates, qemuImgCreateOverlay, type OverlaySource } from '../../src/drivers/kvm/overlay.js';
import { ensureTinyGuest } from '../support/tiny-guest.js';

let root: string;
let src: OverlaySource;

beforeAll(async () => {
  root = mkdtempSync(join(tmpdir(), 'pga-overlay-'));
  const guest = await ensureTinyGuest();
  src = { qemuImgBinary: 'qemu-img', baseImage: guest.baseImage, baseImageFormat: 'qcow2' };
});

afterAll(() => {
  rmSync(root, { recursive: true, force: true });
});

async function info(file: string): Promise<Record<string, unknown>> {
  const res = await execa('qemu-img', ['info', '--output=json', file]);
  return JSON.parse(res.stdout) as Record<string, unknown>;
}

describe('OverlayTemplates', () => {
  it('copies are byte-identical to what qemu-img creates directly, for several sizes', async () => {
    const dir = join(root, 'identical');
    const templates = new OverlayTemplates(src, join(dir, 'templates'));
    for (const gb of [1, 2, 20, 700]) {
      const copied = join(root, `copied-${gb}.qcow2`);
      const direct = join(root, `direct-${gb}.qcow2`);
      await templates.create(copied, gb);
      await qemuImgCreateOverlay(src, direct, gb);
      expect(readFileSync(copied).equals(readFileSync(direct)), `${gb} GiB`).toBe(true);
      const i = await info(copied);
      expect(i['virtual-size']).toBe(gb * 1024 ** 3);
      expect(i['backing-filename']).toBe(src.baseImage);
      expect(i['backing-filename-format']).toBe('qcow2');
      await execa('qemu-img', ['check', copied]);
      expect(statSync(copied).mode & 0o777).toBe(0o600);
    }
  });

  it('makes one template per size however many creates run at once', async () => {
    const dir = join(root, 'concurrent');
    const templates = new OverlayTemplates(src, join(dir, 'templates'));
    await Promise.all(Array.from({ length: 8 }, (_, i) => templates.create(join(root, `c${i}.qcow2`), 3)));
    expect(readdirSync(join(dir, 'templates'))).toEqual(['overlay-3G.qcow2']);
    const first = readFileSync(join(root, 'c0.qcow2'));
    for (let i = 1; i < 8; i++) expect(readFileSync(join(root, `c${i}.qcow2`)).equals(first)).toBe(true);
  });

  it('never writes through an existing file', async () => {
    const templates = new OverlayTemplates(src, join(root, 'excl', 'templates'));
    const taken = join(root, 'taken.qcow2');
    writeFileSync(taken, 'precious');
    await expect(templates.create(taken, 2)).rejects.toMatchObject({ code: 'EEXIST' });
    expect(readFileSync(taken, 'utf8')).toBe('precious');
  });

  it('a new instance remakes its templates (a stale file from an earlier run is replaced)', async () => {
    const dir = join(root, 'stale', 'templates');
    await new OverlayTemplates(src, dir).create(join(root, 'stale-1.qcow2'), 2);
    writeFileSync(join(dir, 'overlay-2G.qcow2'), 'stale');
    await new OverlayTemplates(src, dir).create(join(root, 'stale-2.qcow2'), 2);
    expect(readFileSync(join(root, 'stale-2.qcow2')).equals(readFileSync(join(root, 'stale-1.qcow2')))).toBe(true);
  });

  it('reports a missing base image with qemu-img’s words, and tries again next time', async () => {
    const missing = join(root, 'missing.qcow2');
    const templates = new OverlayTemplates({ ...src, baseImage: missing }, join(root, 'nobase', 'templates'));
    const err = await templates.create(join(root, 'nobase.qcow2'), 2).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OverlayError);
    expect((err as OverlayError).detail).toContain('missing.qcow2');
    expect(readdirSync(join(root, 'nobase', 'templates'))).toEqual([]);
    // The base appears: the failure was not cached.
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', missing, '1G']);
    await templates.create(join(root, 'nobase.qcow2'), 2);
    expect((await info(join(root, 'nobase.qcow2')))['backing-filename']).toBe(missing);
  });
});
