/**
 * "Is KVM really usable?" — answered by running a guest, not by opening
 * /dev/kvm. Some hosts expose a /dev/kvm that opens fine but cannot run a
 * standard guest (a nested PVM hypervisor hangs at the first switch to
 * protected mode; `-cpu host` can fail with `failed to set MSR 0x10a`).
 *
 * The probe is a 174-byte multiboot image that qemu boots with `-kernel`: it
 * goes from real mode (qemu's multiboot option ROM) to 32-bit protected mode,
 * writes `P` to COM1, builds a 2 MiB identity map, enters long mode, writes
 * `L` and exits through isa-debug-exit (qemu exit code 33). That is the same
 * path every x86-64 kernel takes early in boot, so a probe that prints `PL`
 * and exits 33 means qemu with this accelerator can boot real guests.
 * It takes a fraction of a second under TCG (docs/driver.md), less under KVM.
 *
 * Source (GNU as, `as --32` + `ld -m elf_i386 -Ttext 0 --oformat binary`,
 * first 174 bytes; the page tables live in the multiboot bss that qemu zeroes):
 *
 *   .code32; .set BASE,0x100000; MAGIC=0x1BADB002; FLAGS=0x00010000 (a.out kludge)
 *   header: .long MAGIC, FLAGS, -(MAGIC+FLAGS), BASE+header, BASE, BASE+end, BASE+bss_end, BASE+entry
 *   entry:  mov $0x3f8,%dx; mov $'P',%al; out %al,%dx
 *           PML4[0]=pdpt|3; PDPT[0]=pd|3; PD[0]=0x83         (2 MiB page at 0)
 *           cr3=pml4; cr4|=PAE; EFER(0xC0000080)|=LME; cr0|=PG|PE
 *           lgdt gdtr; ljmp $0x08,$long64
 *   .code64
 *   long64: mov $0x3f8,%dx; mov $'L',%al; out %al,%dx
 *           mov $0xf4,%dx; mov $0x10,%al; out %al,%dx; 1: hlt; jmp 1b
 *   gdt:    .quad 0, 0x00209A0000000000; gdtr: .word 15; .long BASE+gdt
 *   end:    .align 4096; pml4/pdpt/pd: .skip 4096 each; bss_end:
 */
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { execa } from 'execa';

const PROBE_IMAGE_HEX =
  '02b0ad1b00000100fe4f51e40000100000001000ae001000004010002000100066baf803b050eebf00101000c70703201000bf00201000c707' +
  '03301000bf00301000c70783000000b8001010000f22d80f20e083c8200f22e0b9800000c00f320d000100000f300f20c00d010000800f22c0' +
  '0f0115a8001000ea80001000080066baf803b04cee66baf400b010eef4ebfd8db42600000000000000000000000000000000009a20000f0098' +
  '001000';

/** qemu's exit status when the guest writes 0x10 to isa-debug-exit: (0x10 << 1) | 1. */
const PROBE_EXIT = 33;
const PROBE_OUTPUT = 'PL';

export interface GuestProbeResult {
  ok: boolean;
  accel: 'kvm' | 'tcg';
  ms: number;
  /** What went wrong, for a human: qemu's stderr, or how far the guest got. */
  detail?: string;
}

/** The qemu argv of the probe; pure. `-cpu` matches what the driver uses for the accelerator. */
export function probeArgv(accel: 'kvm' | 'tcg', image: string, serialFile: string): string[] {
  return [
    '-nodefaults', '-no-user-config',
    '-accel', accel,
    '-cpu', accel === 'kvm' ? 'host' : 'max',
    '-machine', 'pc',
    '-m', '16',
    '-display', 'none',
    '-monitor', 'none',
    '-kernel', image,
    '-device', 'isa-debug-exit,iobase=0xf4,iosize=0x04',
    '-chardev', `file,id=s0,path=${serialFile}`,
    '-serial', 'chardev:s0',
  ];
}

/**
 * Boot the probe under `accel` and report whether it reached long mode and
 * exited. Never throws; a missing qemu is `ok: false` with the reason.
 */
export async function probeGuest(opts: { qemuBinary: string; accel: 'kvm' | 'tcg'; timeoutMs?: number }): Promise<GuestProbeResult> {
  const dir = await mkdtemp(path.join(tmpdir(), 'pga-kvm-probe-'));
  const image = path.join(dir, 'probe.bin');
  const serial = path.join(dir, 'serial.out');
  const started = performance.now();
  try {
    await writeFile(image, Buffer.from(PROBE_IMAGE_HEX, 'hex'));
    const res = await execa(opts.qemuBinary, probeArgv(opts.accel, image, serial), {
      stdin: 'ignore',
      stdout: 'ignore',
      stderr: 'pipe',
      reject: false,
      timeout: opts.timeoutMs ?? 5_000,
      killSignal: 'SIGKILL',
    });
    const ms = Math.round(performance.now() - started);
    const out = await readFile(serial, 'utf8').catch(() => '');
    if (res.exitCode === PROBE_EXIT && out === PROBE_OUTPUT) return { ok: true, accel: opts.accel, ms };
    const stderr = String(res.stderr ?? '').trim().split('\n').filter((l) => !/terminating on signal/.test(l)).join(' ').slice(-500);
    if ((res as { code?: string }).code === 'ENOENT') return { ok: false, accel: opts.accel, ms, detail: `${opts.qemuBinary} not found` };
    if (res.timedOut) {
      const reached = out.includes('P') ? 'reached protected mode but not long mode' : 'never reached protected mode';
      return { ok: false, accel: opts.accel, ms, detail: `a test guest hung (${reached}) within ${opts.timeoutMs ?? 5_000} ms${stderr ? `: ${stderr}` : ''}` };
    }
    return { ok: false, accel: opts.accel, ms, detail: stderr || `qemu exited with ${String(res.exitCode)} and the guest printed ${JSON.stringify(out)}` };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
