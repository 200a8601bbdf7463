import { describe, expect, it } from 'vitest';
import { attachSeedAndStart, buildQemuArgv, QEMU_SANDBOX, type QemuArgs } from '../../src/drivers/kvm/argv.js';
import { resolveAccel } from '../../src/drivers/kvm/accel.js';
import { argvHasVmName } from '../../src/drivers/kvm/process.js';
import { qemuOptionValue, QemuOptionError } from '../../src/drivers/kvm/qemu-option.js';
import { silentLogger } from '../../src/util/logger.js';

function args(over: Partial<QemuArgs> = {}): QemuArgs {
  return {
    accel: 'tcg',
    name: 'paygress-vm1',
    uuid: '0b7c3a56-9a8e-4b0c-8f7e-2d1c3b4a5e6f',
    dir: '/var/lib/paygress/vms/vm1',
    vcpus: 2,
    memoryMb: 1024,
    bindAddress: '0.0.0.0',
    sshPort: 30001,
    ...over,
  };
}

/** The value following `flag` (first or all occurrences). */
function after(argv: string[], flag: string): string | undefined {
  const i = argv.indexOf(flag);
  return i >= 0 ? argv[i + 1] : undefined;
}
function allAfter(argv: string[], flag: string): string[] {
  return argv.flatMap((a, i) => (a === flag ? [argv[i + 1]!] : []));
}

describe('qemuOptionValue', () => {
  it('doubles commas and rejects control characters', () => {
    expect(qemuOptionValue('/a,b,,c')).toBe('/a,,b,,,,c');
    expect(() => qemuOptionValue('/a\nb')).toThrow(QemuOptionError);
    expect(() => qemuOptionValue('/a\u0000b')).toThrow(QemuOptionError);
    expect(() => qemuOptionValue('')).toThrow(QemuOptionError);
  });
});

describe('buildQemuArgv', () => {
  it('uses -accel tcg -cpu max under tcg and -accel kvm -cpu host under kvm', () => {
    const t = buildQemuArgv(args({ accel: 'tcg' }));
    expect(after(t, '-accel')).toBe('tcg');
    expect(after(t, '-cpu')).toBe('max');
    const k = buildQemuArgv(args({ accel: 'kvm' }));
    expect(after(k, '-accel')).toBe('kvm');
    expect(after(k, '-cpu')).toBe('host');
  });

  it('daemonizes with a pidfile and a display of none, never -nographic', () => {
    const a = buildQemuArgv(args());
    expect(a).toContain('-daemonize');
    expect(after(a, '-pidfile')).toBe('/var/lib/paygress/vms/vm1/qemu.pid');
    expect(after(a, '-display')).toBe('none');
    expect(a).not.toContain('-nographic');
    expect(a).toContain('-nodefaults');
    expect(a).toContain('-no-user-config');
  });

  it('names the VM (visible in /proc/<pid>/cmdline), sets uuid, memory and cpus', () => {
    const a = buildQemuArgv(args());
    expect(after(a, '-name')).toBe('paygress-vm1,process=paygress-vm1');
    expect(after(a, '-uuid')).toBe('0b7c3a56-9a8e-4b0c-8f7e-2d1c3b4a5e6f');
    expect(after(a, '-m')).toBe('1024');
    expect(after(a, '-smp')).toBe('2');
  });

  it('forwards the SSH port on the bind address over user-mode net with virtio-net', () => {
    const a = buildQemuArgv(args({ bindAddress: '127.0.0.1', sshPort: 42001 }));
    expect(after(a, '-netdev')).toBe('user,id=net0,hostfwd=tcp:127.0.0.1:42001-:22');
    expect(after(a, '-device')).toBe('virtio-net-pci,netdev=net0');
  });

  it('attaches the overlay as qcow2, serial to a file, and starts paused with a QMP socket for the seed', () => {
    const a = buildQemuArgv(args());
    expect(allAfter(a, '-drive')).toEqual([
      'file=/var/lib/paygress/vms/vm1/disk.qcow2,if=virtio,format=qcow2,cache=writeback',
    ]);
    // The console is a ring in qemu's memory (drained over QMP), never a file a guest could grow without end.
    expect(after(a, '-chardev')).toBe('ringbuf,id=serial0,size=65536');
    expect(after(a, '-serial')).toBe('chardev:serial0');
    expect(after(a, '-qmp')).toBe('unix:/var/lib/paygress/vms/vm1/qmp.sock,server=on,wait=off');
    expect(a).toContain('-S');
  });

  it('with seedAtStart puts the seed read-only raw on the command line and runs at once', () => {
    const a = buildQemuArgv(args({ seedAtStart: true }));
    expect(allAfter(a, '-drive')).toEqual([
      'file=/var/lib/paygress/vms/vm1/disk.qcow2,if=virtio,format=qcow2,cache=writeback',
      'file=/var/lib/paygress/vms/vm1/seed.iso,if=virtio,format=raw,readonly=on',
    ]);
    expect(a).not.toContain('-S');
  });

  it('the QMP commands attach the seed read-only as a virtio disk, then start the VM', () => {
    // A path with a comma and a quote stays one JSON string: QMP needs no option escaping.
    const cmds = attachSeedAndStart('/srv/vms,format=raw/x"y');
    expect(cmds.map((c) => c.execute)).toEqual(['blockdev-add', 'device_add', 'cont']);
    expect(cmds[0]!.arguments).toEqual({
      driver: 'raw',
      'node-name': 'seed',
      'read-only': true,
      file: { driver: 'file', filename: '/srv/vms,format=raw/x"y/seed.iso', 'read-only': true },
    });
    expect(cmds[1]!.arguments).toEqual({ driver: 'virtio-blk-pci', drive: 'seed', id: 'seed0' });
    expect(JSON.parse(JSON.stringify(cmds))).toEqual(cmds);
    expect(() => attachSeedAndStart('relative/dir')).toThrow(RangeError);
  });

  it('escapes a directory containing commas so it cannot add options', () => {
    const a = buildQemuArgv(args({ dir: '/srv/vms,format=raw/x' }));
    expect(allAfter(a, '-drive')[0]).toBe('file=/srv/vms,,format=raw/x/disk.qcow2,if=virtio,format=qcow2,cache=writeback');
    expect(after(a, '-qmp')).toBe('unix:/srv/vms,,format=raw/x/qmp.sock,server=on,wait=off');
    // -pidfile is a plain argument, not an option string: taken literally.
    expect(after(a, '-pidfile')).toBe('/srv/vms,format=raw/x/qemu.pid');
  });

  it('escapes a bind address with a comma and rejects newlines anywhere', () => {
    expect(after(buildQemuArgv(args({ bindAddress: '127.0.0.1,restrict=on' })), '-netdev'))
      .toBe('user,id=net0,hostfwd=tcp:127.0.0.1,,restrict=on:30001-:22');
    expect(() => buildQemuArgv(args({ dir: '/srv/a\nb' }))).toThrow(QemuOptionError);
    expect(() => buildQemuArgv(args({ append: 'console=ttyS0\n', kernel: '/k' }))).toThrow(QemuOptionError);
  });

  it('adds direct kernel boot only when a kernel is configured', () => {
    const off = buildQemuArgv(args());
    expect(off).not.toContain('-kernel');
    expect(off).not.toContain('-initrd');
    expect(off).not.toContain('-append');
    const on = buildQemuArgv(args({ kernel: '/boot/vmlinuz', initrd: '/boot/initrd.img', append: 'console=ttyS0 root=LABEL=rootfs' }));
    expect(after(on, '-kernel')).toBe('/boot/vmlinuz');
    expect(after(on, '-initrd')).toBe('/boot/initrd.img');
    expect(after(on, '-append')).toBe('console=ttyS0 root=LABEL=rootfs');
  });

  it('includes the seccomp sandbox that works with -daemonize unless turned off', () => {
    expect(after(buildQemuArgv(args()), '-sandbox')).toBe(QEMU_SANDBOX);
    expect(QEMU_SANDBOX).not.toMatch(/elevateprivileges=deny|spawn=deny/);
    expect(buildQemuArgv(args({ sandbox: false }))).not.toContain('-sandbox');
  });

  it('rejects non-canonical uuids, relative dirs and bad numbers', () => {
    expect(() => buildQemuArgv(args({ uuid: 'x,y' }))).toThrow(RangeError);
    expect(() => buildQemuArgv(args({ dir: 'rel/dir' }))).toThrow(RangeError);
    expect(() => buildQemuArgv(args({ memoryMb: 0 }))).toThrow(RangeError);
    expect(() => buildQemuArgv(args({ vcpus: 1.5 }))).toThrow(RangeError);
    expect(() => buildQemuArgv(args({ sshPort: 70000 }))).toThrow(RangeError);
  });
});

describe('argvHasVmName (the pid-reuse guard)', () => {
  const argv = buildQemuArgv(args({ name: 'paygress-vm1' }));
  it('recognises the argv the builder produced', () => {
    expect(argvHasVmName(argv, 'paygress-vm1')).toBe(true);
  });
  it('does not confuse a name with a longer one or a mere mention elsewhere', () => {
    expect(argvHasVmName(buildQemuArgv(args({ name: 'paygress-vm10' })), 'paygress-vm1')).toBe(false);
    expect(argvHasVmName(['sleep', 'paygress-vm1'], 'paygress-vm1')).toBe(false);
    expect(argvHasVmName(['qemu', '-name'], 'paygress-vm1')).toBe(false);
  });
});

describe('resolveAccel', () => {
  it('keeps an explicit choice and falls back to tcg when the device cannot be opened', async () => {
    expect(await resolveAccel('tcg', silentLogger, '/dev/null')).toBe('tcg');
    expect(await resolveAccel('kvm', silentLogger, '/nonexistent/kvm')).toBe('kvm');
    expect(await resolveAccel('auto', silentLogger, '/nonexistent/kvm')).toBe('tcg');
    // Any device that opens read-write counts as usable; /dev/null stands in for /dev/kvm.
    expect(await resolveAccel('auto', silentLogger, '/dev/null')).toBe('kvm');
  });
});
