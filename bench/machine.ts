/** What the bench ran on, and the agent process's memory as the kernel counts it. */
import { execa } from 'execa';
import { readFileSync } from 'node:fs';
import os from 'node:os';
import type { MachineInfo } from './results.js';
import { r1 } from './stats.js';

export function procStatusKb(pid: number, field: 'VmRSS' | 'VmHWM' | 'RssAnon' | 'RssFile'): number {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no ${field} for pid ${pid}`);
  return Number(m[1]);
}

export async function machine(): Promise<MachineInfo> {
  const qemu = await execa('qemu-system-x86_64', ['--version'], { reject: false });
  return {
    cpu: os.cpus()[0]?.model ?? 'unknown',
    cores: os.cpus().length,
    memory_gb: r1(os.totalmem() / 2 ** 30),
    kernel: os.release(),
    os: (() => {
      try {
        return /PRETTY_NAME="([^"]+)"/.exec(readFileSync('/etc/os-release', 'utf8'))?.[1] ?? os.type();
      } catch {
        return os.type();
      }
    })(),
    node: process.version,
    qemu: String(qemu.stdout).split('\n')[0] ?? 'unknown',
    accel: 'tcg (-cpu max)',
    guest: 'tiny (Debian cloud kernel + busybox initramfs)',
  };
}
