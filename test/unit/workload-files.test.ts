/**
 * The workload directory's names: one file per entry, paths built under the
 * workload's folder, and the sun_path limit checked for every socket.
 */
import { describe, expect, it } from 'vitest';
import { assertSocketPathsFit, isWorkloadId, MAX_ID_LENGTH, SUN_PATH_MAX, VM_FILES, vmFile, workloadDir } from '../../src/drivers/kvm/workload-files.js';

describe('workload files', () => {
  it('names each file once, as a plain file name', () => {
    const names = Object.values(VM_FILES).map((f) => f.name);
    expect(new Set(names).size).toBe(names.length);
    for (const n of names) expect(n).toMatch(/^[a-z]+\.[a-z0-9]+$/);
  });

  it('builds paths inside the workload directory', () => {
    const dir = workloadDir('/var/lib/paygress-agent/vms', 'w-1');
    expect(dir).toBe('/var/lib/paygress-agent/vms/w-1');
    expect(vmFile(dir, 'meta')).toBe('/var/lib/paygress-agent/vms/w-1/vm.json');
    expect(vmFile(dir, 'qmpSocket')).toBe('/var/lib/paygress-agent/vms/w-1/qmp.sock');
  });

  it('accepts only boring ids as directory names', () => {
    expect(isWorkloadId('a'.repeat(MAX_ID_LENGTH))).toBe(true);
    for (const bad of ['', 'a'.repeat(MAX_ID_LENGTH + 1), '..', 'a/b', 'A', 'a b', 'a\n']) {
      expect(isWorkloadId(bad), JSON.stringify(bad)).toBe(false);
      expect(() => workloadDir('/v', bad)).toThrow(RangeError);
    }
  });

  it('refuses a vmRoot under which the longest socket path would not fit in sun_path, naming the longest that fits', () => {
    const sockets = Object.values(VM_FILES).filter((f) => 'socket' in f).map((f) => f.name);
    expect(sockets).toEqual(expect.arrayContaining(['qmp.sock', 'passt.sock']));
    // '/' + id + '/' + the longest socket name: what each workload adds to vmRoot.
    const added = 1 + MAX_ID_LENGTH + 1 + Math.max(...sockets.map((s) => s.length));
    const longestRoot = SUN_PATH_MAX - added;
    const rootOf = (len: number) => `/${'v'.repeat(len - 1)}`;
    expect(() => assertSocketPathsFit(rootOf(longestRoot))).not.toThrow();
    expect(() => assertSocketPathsFit(rootOf(longestRoot + 1))).toThrow(new RegExp(`at most ${longestRoot} bytes`));
    // Bytes, not characters: a multi-byte vmRoot has less room.
    expect(() => assertSocketPathsFit(`/${'é'.repeat(longestRoot - 1)}`)).toThrow(RangeError);
  });
});
