import { describe, expect, it } from 'vitest';
import { buildQemuArgv, type QemuArgs } from '../../src/drivers/kvm/argv.js';
import { argvIsPasstFor, buildPasstArgv, PASST_GUEST } from '../../src/drivers/kvm/passt.js';

const base: QemuArgs = {
  accel: 'tcg',
  name: 'paygress-vm1',
  uuid: '0b7c3a56-9a8e-4b0c-8f7e-2d1c3b4a5e6f',
  dir: '/var/lib/paygress/vms/vm1',
  vcpus: 1,
  memoryMb: 256,
  bindAddress: '127.0.0.1',
  sshPort: 30001,
};
const netdev = (a: string[]) => a[a.indexOf('-netdev') + 1];

describe('qemu network argv per mode', () => {
  it('user keeps the old hostfwd, restricted adds restrict=on, passt attaches to the VM socket', () => {
    expect(netdev(buildQemuArgv({ ...base, network: 'user' }))).toBe('user,id=net0,hostfwd=tcp:127.0.0.1:30001-:22');
    expect(netdev(buildQemuArgv(base))).toBe('user,id=net0,hostfwd=tcp:127.0.0.1:30001-:22');
    expect(netdev(buildQemuArgv({ ...base, network: 'restricted' }))).toBe('user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:30001-:22');
    expect(netdev(buildQemuArgv({ ...base, network: 'passt', dir: '/srv/a,b' }))).toBe(
      'stream,id=net0,server=off,addr.type=unix,addr.path=/srv/a,,b/passt.sock',
    );
  });
});

describe('buildPasstArgv', () => {
  const args = { socket: '/v/vm1/passt.sock', pidfile: '/v/vm1/passt.pid', logFile: '/v/vm1/passt.log', bindAddress: '127.0.0.1', sshPort: 30001 };

  it('never maps the gateway to the host, forwards only SSH on the bind address, no UDP', () => {
    const a = buildPasstArgv(args);
    expect(a).toContain('--no-map-gw');
    expect(a).toContain('--one-off');
    expect(a[a.indexOf('--tcp-ports') + 1]).toBe('127.0.0.1/30001:22');
    expect(a[a.indexOf('--udp-ports') + 1]).toBe('none');
    expect(a[a.indexOf('--address') + 1]).toBe(PASST_GUEST.address);
    expect(a[a.indexOf('--gateway') + 1]).toBe(PASST_GUEST.gateway);
    expect(a).not.toContain('--runas');
    expect(buildPasstArgv({ ...args, runAs: { uid: 0, gid: 0 } }).slice(-2)).toEqual(['--runas', '0:0']);
  });

  it('rejects what would change the meaning of an argument', () => {
    expect(() => buildPasstArgv({ ...args, bindAddress: '127.0.0.1/1-2' })).toThrow(RangeError);
    expect(() => buildPasstArgv({ ...args, socket: 'rel/passt.sock' })).toThrow(RangeError);
    expect(() => buildPasstArgv({ ...args, socket: `/${'x'.repeat(120)}/passt.sock` })).toThrow(/108|107/);
    expect(() => buildPasstArgv({ ...args, sshPort: 70000 })).toThrow(RangeError);
  });

  it('identifies a passt by the exact socket path (not a prefix)', () => {
    const a = ['passt', ...buildPasstArgv(args)];
    expect(argvIsPasstFor(a, '/v/vm1/passt.sock')).toBe(true);
    expect(argvIsPasstFor(a, '/v/vm1/passt.soc')).toBe(false);
    expect(argvIsPasstFor(['passt', '--socket', '/v/vm10/passt.sock'], '/v/vm1/passt.sock')).toBe(false);
  });
});
