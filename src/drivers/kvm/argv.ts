/**
 * Pure qemu argv builder. Knows nothing of processes or files: given resolved
 * settings it returns the exact argument vector. Every value interpolated into
 * a comma-separated qemu option string goes through `qemuOptionValue`.
 *
 * No secret ever reaches this function: the root password travels only inside
 * the seed ISO, as a hash.
 */
import path from 'node:path';
import { qemuOptionValue as opt, qemuPlainValue as plain } from './qemu-option.js';
import { QGA_PORT_NAME } from './guest-agent-protocol.js';
import { vmFile } from './workload-files.js';

/**
 * The seccomp policy that works together with `-daemonize` on qemu 7.2
 * (verified here): `elevateprivileges=deny` (and `=children`) and `spawn=deny`
 * make the daemonizing qemu die with SIGSYS / exit 1 because the filter is
 * installed before qemu forks and calls setsid, so those two stay allowed.
 */
export const QEMU_SANDBOX = 'on,obsolete=deny,resourcecontrol=deny';

export interface QemuArgs {
  accel: 'kvm' | 'tcg';
  /** Full VM name (`namePrefix + id`); shows up in /proc/<pid>/cmdline for the pid-reuse guard. */
  name: string;
  uuid: string;
  /** Workload directory; serial log, pidfile, overlay and seed live here. */
  dir: string;
  vcpus: number;
  memoryMb: number;
  bindAddress: string;
  sshPort: number;
  kernel?: string;
  initrd?: string;
  append?: string;
  /** Add `-sandbox` (seccomp). Default true. */
  sandbox?: boolean;
  /**
   * `false` (what the driver does): the VM starts paused (`-S`) without the
   * seed, and the driver attaches the seed over QMP (`attachSeedAndStart`)
   * and starts it, so the seed is written while qemu initialises. `true`: the
   * seed is on the command line and the VM runs at once (the bench's floor).
   */
  seedAtStart?: boolean;
  /**
   * `user`: qemu's user-mode network with `hostfwd` (the guest can reach the
   * host's loopback at 10.0.2.2). `restricted`: the same with `restrict=on`:
   * the SSH hostfwd still works, every guest-initiated connection is dropped.
   * `passt`: connect to the workload's passt socket, which owns the SSH
   * forward. `tap`: open the persistent tap `tap.device` (made at install
   * time, see src/hostnet/) with the slot's MAC. Default `user`; the driver picks.
   */
  network?: 'user' | 'restricted' | 'passt' | 'tap';
  /** With `network: 'tap'`. */
  tap?: { device: string; mac: string };
  /**
   * Give the guest a qemu guest-agent port (warm-pool VMs only, until their
   * hand-off): virtio-serial port `org.qemu.guest_agent.0` on the unix
   * socket `qga.sock` in the workload dir. Cold VMs never get one.
   */
  guestAgent?: boolean;
}

/** The serial console's chardev id, for QMP's ringbuf-read. */
export const CONSOLE_DEVICE = 'serial0';
/**
 * Bytes of console output qemu keeps until the driver reads them (a power of
 * two, as qemu requires). Output beyond it between two reads overwrites the
 * oldest: the guest can only lose its own console lines.
 */
export const CONSOLE_RING_BYTES = 65536;

/** Read (and remove) what the console ring holds, as base64 (a byte stream need not be UTF-8). */
export function readConsoleRing(): QmpCommand[] {
  return [{ execute: 'ringbuf-read', arguments: { device: CONSOLE_DEVICE, size: CONSOLE_RING_BYTES, format: 'base64' } }];
}

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function positiveInt(value: number, what: string): string {
  if (!Number.isInteger(value) || value <= 0) throw new RangeError(`${what} must be a positive integer`);
  return String(value);
}

const TAP_DEVICE_RE = /^[a-z][a-z0-9]{0,14}$/;
const MAC_RE = /^([0-9a-f]{2}:){5}[0-9a-f]{2}$/;

function networkArgs(a: QemuArgs): string[] {
  if (a.network === 'tap') {
    if (!a.tap || !TAP_DEVICE_RE.test(a.tap.device) || !MAC_RE.test(a.tap.mac)) throw new RangeError('tap mode needs a tap device name and a MAC');
    // script=no: the tap is set up already; qemu (unprivileged) only opens it.
    return ['-netdev', `tap,id=net0,ifname=${a.tap.device},script=no,downscript=no`, '-device', `virtio-net-pci,netdev=net0,mac=${a.tap.mac}`];
  }
  const netdev = a.network === 'passt'
    // passt listens on the SSH port itself; qemu only talks to its socket.
    ? `stream,id=net0,server=off,addr.type=unix,addr.path=${opt(vmFile(a.dir, 'passtSocket'))}`
    : `user,id=net0,${a.network === 'restricted' ? 'restrict=on,' : ''}hostfwd=tcp:${opt(a.bindAddress)}:${a.sshPort}-:22`;
  return ['-netdev', netdev, '-device', 'virtio-net-pci,netdev=net0'];
}

export function buildQemuArgv(a: QemuArgs): string[] {
  if (!UUID_RE.test(a.uuid)) throw new RangeError('uuid must be a canonical UUID');
  if (!path.isAbsolute(a.dir)) throw new RangeError('dir must be absolute');
  if (!Number.isInteger(a.sshPort) || a.sshPort < 1 || a.sshPort > 65535) throw new RangeError('sshPort out of range');
  const name = opt(a.name);
  const argv: string[] = [
    // No per-user or default config may add devices behind our back.
    '-nodefaults',
    '-no-user-config',
    '-name', `${name},process=${name}`,
    '-uuid', a.uuid,
    '-accel', a.accel,
    // -cpu host fails under tcg; -cpu max gives tcg every feature it emulates.
    '-cpu', a.accel === 'kvm' ? 'host' : 'max',
    '-m', positiveInt(a.memoryMb, 'memoryMb'),
    '-smp', positiveInt(a.vcpus, 'vcpus'),
    // Never -nographic: qemu 7.2 refuses it together with -daemonize.
    '-display', 'none',
    // The console goes to a ring in qemu's memory, never to a file: a guest
    // writing to ttyS0 without end must not fill the host's disk. The driver
    // drains it over QMP (ringbuf-read) into a size-capped serial.log.
    '-chardev', `ringbuf,id=${CONSOLE_DEVICE},size=${CONSOLE_RING_BYTES}`,
    '-serial', `chardev:${CONSOLE_DEVICE}`,
    '-drive', `file=${opt(vmFile(a.dir, 'disk'))},if=virtio,format=qcow2,cache=writeback`,
    ...(a.seedAtStart ? ['-drive', `file=${opt(vmFile(a.dir, 'seed'))},if=virtio,format=raw,readonly=on`] : []),
    ...networkArgs(a),
  ];
  if (a.kernel !== undefined) {
    argv.push('-kernel', plain(a.kernel));
    if (a.initrd !== undefined) argv.push('-initrd', plain(a.initrd));
    if (a.append !== undefined) argv.push('-append', plain(a.append));
  }
  if (a.guestAgent) argv.push(...guestAgentArgs(a.dir));
  // The agent's control channel; a unix socket in the workload's 0700 folder.
  argv.push('-qmp', `unix:${opt(vmFile(a.dir, 'qmpSocket'))},server=on,wait=off`);
  if (!a.seedAtStart) argv.push('-S');
  if (a.sandbox ?? true) argv.push('-sandbox', QEMU_SANDBOX);
  // The daemonizing parent exits once the VM is set up; the pidfile exists by then.
  argv.push('-daemonize', '-pidfile', plain(vmFile(a.dir, 'pidfile')));
  return argv;
}

/** qemu ids of the guest-agent channel's parts, for removing them over QMP at hand-off. */
export const GUEST_AGENT_CHARDEV = 'qga0';
export const GUEST_AGENT_PORT = 'qgaport0';
const GUEST_AGENT_BUS = 'qgaserial0';

function guestAgentArgs(dir: string): string[] {
  return [
    // server=on,wait=off: qemu listens, the guest boots without a client; one client at a time.
    '-chardev', `socket,id=${GUEST_AGENT_CHARDEV},path=${opt(vmFile(dir, 'qgaSocket'))},server=on,wait=off`,
    '-device', `virtio-serial-pci,id=${GUEST_AGENT_BUS}`,
    '-device', `virtserialport,bus=${GUEST_AGENT_BUS}.0,chardev=${GUEST_AGENT_CHARDEV},name=${QGA_PORT_NAME},id=${GUEST_AGENT_PORT}`,
  ];
}

/**
 * Take the guest-agent channel out of a running VM for good: unplug the port
 * (the guest sees it vanish, and its qemu-ga unit, bound to the port's
 * device, stops), then remove the chardev, which closes its listening socket.
 */
export function removeGuestAgentChannel(): QmpCommand[] {
  return [
    { execute: 'device_del', arguments: { id: GUEST_AGENT_PORT } },
    { execute: 'chardev-remove', arguments: { id: GUEST_AGENT_CHARDEV } },
  ];
}

export interface QmpCommand {
  execute: string;
  arguments?: Record<string, unknown>;
}

/**
 * What the driver tells a VM started paused once its seed ISO is written:
 * attach the seed read-only as a second virtio disk, then run. Added before
 * the guest ever runs, the disk is there when firmware and kernel enumerate
 * PCI, as if it had been on the command line. QMP is JSON, so the path needs
 * no qemu option escaping.
 */
export function attachSeedAndStart(dir: string): QmpCommand[] {
  if (!path.isAbsolute(dir)) throw new RangeError('dir must be absolute');
  return [
    {
      execute: 'blockdev-add',
      arguments: {
        driver: 'raw',
        'node-name': 'seed',
        'read-only': true,
        file: { driver: 'file', filename: vmFile(dir, 'seed'), 'read-only': true },
      },
    },
    { execute: 'device_add', arguments: { driver: 'virtio-blk-pci', drive: 'seed', id: 'seed0' } },
    { execute: 'cont' },
  ];
}
