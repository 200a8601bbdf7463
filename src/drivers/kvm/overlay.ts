/**
 * Disk overlays: a qcow2 file per workload that backs onto the read-only base
 * image. `qemu-img create` with the same backing file, backing format and size
 * writes the same bytes every time (a header naming the backing file and empty
 * L1/refcount tables, no per-image identity), so qemu-img makes one
 * template per size per agent run and each workload gets a copy of it: a copy
 * is far cheaper than a qemu-img process on the spawn's critical path
 * (docs/driver.md). A test checks the copy is byte-identical to what qemu-img
 * makes for the workload directly.
 */
import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { chmod, copyFile, mkdir, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';

export interface OverlaySource {
  qemuImgBinary: string;
  /** Absolute: qemu-img resolves a relative backing path against the overlay's folder. */
  baseImage: string;
  baseImageFormat: 'qcow2' | 'raw';
}

export class OverlayError extends Error {
  constructor(
    message: string,
    readonly detail: string,
  ) {
    super(message);
  }
}

/** `qemu-img create` of a qcow2 overlay of `diskGb` GiB backing onto the base image. */
export async function qemuImgCreateOverlay(src: OverlaySource, file: string, diskGb: number): Promise<void> {
  if (!Number.isInteger(diskGb) || diskGb <= 0) throw new RangeError('diskGb must be a positive integer');
  const res = await execa(
    src.qemuImgBinary,
    ['create', '-q', '-f', 'qcow2', '-b', path.resolve(src.baseImage), '-F', src.baseImageFormat, file, `${diskGb}G`],
    { stdin: 'ignore', stdout: 'ignore', stderr: 'pipe', reject: false },
  );
  if (res.exitCode !== 0) {
    throw new OverlayError('disk overlay creation failed', String(res.stderr ?? '').trim() || (res.shortMessage ?? 'qemu-img failed'));
  }
}

/**
 * Makes overlays by copying a per-size template from `dir`. Templates are made
 * afresh once per instance (so per agent run: an upgraded qemu-img or a moved
 * base image never leaves a stale one in use) and shared by concurrent creates.
 */
export class OverlayTemplates {
  private readonly made = new Map<number, Promise<string>>();

  constructor(
    private readonly src: OverlaySource,
    private readonly dir: string,
  ) {
    if (!path.isAbsolute(dir)) throw new RangeError('overlay template dir must be an absolute path');
  }

  /** Write the overlay for `diskGb` GiB to `file`, which must not exist yet. */
  async create(file: string, diskGb: number): Promise<void> {
    const template = await this.template(diskGb);
    // COPYFILE_EXCL: never write through an existing file (or a planted link).
    // The copy takes the template's 0600 mode.
    await copyFile(template, file, constants.COPYFILE_EXCL);
  }

  private template(diskGb: number): Promise<string> {
    let pending = this.made.get(diskGb);
    if (!pending) {
      pending = this.make(diskGb);
      this.made.set(diskGb, pending);
      // A failure is not remembered: the next create tries again.
      pending.catch(() => this.made.delete(diskGb));
    }
    return pending;
  }

  private async make(diskGb: number): Promise<string> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    const final = path.join(this.dir, `overlay-${diskGb}G.qcow2`);
    // Made under a temporary name and renamed: a copy never sees a half-written template.
    const tmp = path.join(this.dir, `.overlay-${diskGb}G.${randomBytes(6).toString('hex')}.tmp`);
    try {
      await qemuImgCreateOverlay(this.src, tmp, diskGb);
      await chmod(tmp, 0o600);
      await rename(tmp, final);
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
    return final;
  }
}
