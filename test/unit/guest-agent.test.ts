import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { GuestAgentSession } from '../../src/drivers/kvm/guest-agent.js';
import { parse } from 'yaml';
import { buildQemuArgv, GUEST_AGENT_CHARDEV, GUEST_AGENT_PORT, removeGuestAgentChannel, type QemuArgs } from '../../src/drivers/kvm/argv.js';
import { buildIdleCloudConfig, idleCloudConfigObject, SSHD_DROPIN_CONTENT, SSHD_DROPIN_PATH, SEED_YAML_OPTIONS } from '../../src/drivers/kvm/cloud-config.js';
import {
  AnswerFramer,
  assertHostname,
  fileHandleOf,
  fileOpen,
  guestText,
  isEmptyReturn,
  isSyncAnswer,
  parseAnswer,
  readBytesOf,
  setRootAuthorizedKeys,
  syncRequest,
  writtenCountOf,
  QGA_PORT_NAME,
} from '../../src/drivers/kvm/guest-agent-protocol.js';
import { shadowDay, withRootPasswordHash } from '../../src/drivers/kvm/shadow.js';
import { listensOnPort } from '../../src/drivers/kvm/proc-net.js';
import { sha512crypt } from '../../src/util/sha512crypt.js';

const HASH = sha512crypt('tenant-password', 'abcdefgh12345678');
const KEY = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB3Zk6Ue1hXv5vJXxvO4O0L0x0E0bq5D3dQn3yV6m6m1 user@host';

function argv(over: Partial<QemuArgs> = {}): string[] {
  return buildQemuArgv({
    accel: 'tcg', name: 'paygress-vm1', uuid: '0b7c3a56-9a8e-4b0c-8f7e-2d1c3b4a5e6f', dir: '/var/lib/paygress/vms/vm1',
    vcpus: 1, memoryMb: 512, bindAddress: '127.0.0.1', sshPort: 30001, ...over,
  });
}

describe('guest-agent channel in the qemu argv', () => {
  it('idle VMs get the org.qemu.guest_agent.0 port on qga.sock in their folder; cold VMs get none', () => {
    const idle = argv({ guestAgent: true });
    expect(idle).toContain(`socket,id=${GUEST_AGENT_CHARDEV},path=/var/lib/paygress/vms/vm1/qga.sock,server=on,wait=off`);
    expect(idle.some((a) => a.startsWith('virtio-serial-pci,'))).toBe(true);
    expect(idle).toContain(`virtserialport,bus=qgaserial0.0,chardev=${GUEST_AGENT_CHARDEV},name=${QGA_PORT_NAME},id=${GUEST_AGENT_PORT}`);
    for (const cold of [argv(), argv({ guestAgent: false })]) {
      expect(cold.join(' ')).not.toMatch(/qga|virtserialport|virtio-serial|guest_agent/);
    }
  });

  it('a folder with commas cannot add chardev options', () => {
    const a = argv({ dir: '/vms/x,server=off,path=/tmp/evil', guestAgent: true });
    expect(a).toContain(`socket,id=${GUEST_AGENT_CHARDEV},path=/vms/x,,server=off,,path=/tmp/evil/qga.sock,server=on,wait=off`);
  });

  it('removal unplugs the port, then removes the chardev', () => {
    expect(removeGuestAgentChannel()).toEqual([
      { execute: 'device_del', arguments: { id: GUEST_AGENT_PORT } },
      { execute: 'chardev-remove', arguments: { id: GUEST_AGENT_CHARDEV } },
    ]);
  });
});

describe('idle cloud-config', () => {
  const input = { hostname: 'pool-1', finalMessageToken: 'tok_0123456789abcdef', instanceId: 'pool-1-6f1c' };

  it('root locked, no keys, no password, but the same sshd settings as a cold VM', () => {
    const files = buildIdleCloudConfig(input);
    const cfg = parse(files.userData, SEED_YAML_OPTIONS);
    expect(cfg).toEqual(idleCloudConfigObject(input));
    expect(cfg.users).toEqual([{ name: 'root', lock_passwd: true }]);
    expect(cfg.chpasswd).toBeUndefined();
    expect(cfg.ssh_authorized_keys).toBeUndefined();
    expect(cfg.ssh_pwauth).toBe(true);
    expect(cfg.write_files).toEqual([expect.objectContaining({ path: SSHD_DROPIN_PATH, content: SSHD_DROPIN_CONTENT })]);
    expect(files.userData).not.toMatch(/\$6\$/);
  });

  it('a hostile hostname stays one value', () => {
    const evil = 'h\nchpasswd: {users: [{name: root, password: x, type: text}]}';
    const cfg = parse(buildIdleCloudConfig({ ...input, hostname: evil }).userData, SEED_YAML_OPTIONS);
    expect(cfg.hostname).toBe(evil);
    expect(cfg.chpasswd).toBeUndefined();
  });
});

describe('guest-agent commands', () => {
  it('a sync starts with the 0xFF parser reset and carries the id', () => {
    const b = syncRequest(123456789);
    expect(b[0]).toBe(0xff);
    expect(JSON.parse(b.subarray(1).toString())).toEqual({ execute: 'guest-sync-delimited', arguments: { id: 123456789 } });
    expect(b.at(-1)).toBe(0x0a);
    expect(() => syncRequest(0)).toThrow(RangeError);
    expect(() => syncRequest(2 ** 60)).toThrow(RangeError);
  });

  it('keys: replaced (reset), one line each; a key that tries to add a line or an option is refused', () => {
    expect(setRootAuthorizedKeys([KEY])).toEqual({ execute: 'guest-ssh-add-authorized-keys', arguments: { username: 'root', keys: [KEY], reset: true } });
    expect(setRootAuthorizedKeys([]).arguments).toMatchObject({ keys: [], reset: true });
    expect(() => setRootAuthorizedKeys([`${KEY}\ncommand="sh" ssh-ed25519 AAAA evil`])).toThrow(RangeError);
    expect(() => setRootAuthorizedKeys([`${KEY}\r`])).toThrow(RangeError);
    expect(() => setRootAuthorizedKeys(['#comment'])).toThrow(RangeError);
    expect(() => setRootAuthorizedKeys([''])).toThrow(RangeError);
  });

  it('hostnames are DNS labels; paths are plain absolute paths', () => {
    expect(assertHostname('tenant-1')).toBe('tenant-1');
    for (const bad of ['', 'a b', 'x\ny', 'a/b', '-x', 'x-', 'UPPER', 'a'.repeat(64), 'a;reboot']) expect(() => assertHostname(bad)).toThrow(RangeError);
    expect(fileOpen('/etc/hostname', 'w')).toEqual({ execute: 'guest-file-open', arguments: { path: '/etc/hostname', mode: 'w' } });
    for (const bad of ['etc/hostname', '/etc/../shadow', '/etc/./x', '/etc/host name', '/etc/x\n']) expect(() => fileOpen(bad, 'r')).toThrow(RangeError);
  });
});

describe('AnswerFramer', () => {
  it('drops stale bytes before the delimiter, then cuts lines', () => {
    const f = new AnswerFramer(1024);
    f.expectDelimited();
    expect(f.push(Buffer.from('{"return": 1}\n{"return": {}}\ngarbage'))).toEqual([]);
    expect(f.push(Buffer.concat([Buffer.from([0xff]), Buffer.from('{"return": 7}\n{"ret')]))).toEqual([{ kind: 'line', text: '{"return": 7}' }]);
    expect(f.push(Buffer.from('urn": {}}\n'))).toEqual([{ kind: 'line', text: '{"return": {}}' }]);
  });

  it('is bounded: a line or stale run past the limit is oversized, and nothing comes after', () => {
    const f = new AnswerFramer(16);
    expect(f.push(Buffer.alloc(17, 0x41))).toEqual([{ kind: 'oversized' }]);
    expect(f.push(Buffer.from('{"return": {}}\n'))).toEqual([]);
    const g = new AnswerFramer(16);
    g.expectDelimited();
    expect(g.push(Buffer.alloc(10, 0x41))).toEqual([]);
    expect(g.push(Buffer.alloc(10, 0x41))).toEqual([{ kind: 'oversized' }]);
  });

  it('a line split across chunks at any byte gives the same answer', () => {
    const bytes = Buffer.concat([Buffer.from('junk'), Buffer.from([0xff]), Buffer.from('{"return": 42}\n')]);
    for (let cut = 0; cut <= bytes.length; cut++) {
      const f = new AnswerFramer(64);
      f.expectDelimited();
      expect([...f.push(bytes.subarray(0, cut)), ...f.push(bytes.subarray(cut))]).toEqual([{ kind: 'line', text: '{"return": 42}' }]);
    }
  });
});

describe('parseAnswer (total, guest text sanitised)', () => {
  it('returns and errors', () => {
    expect(parseAnswer('{"return": {}}')).toEqual({ kind: 'return', value: {} });
    expect(parseAnswer('{"error": {"class": "GenericError", "desc": "no"}}')).toEqual({ kind: 'error', errorClass: 'GenericError', desc: 'no' });
  });

  it('anything else is invalid, never a throw', () => {
    for (const line of ['', 'not json', '[]', 'null', '42', '"x"', '{}', '{"return": 1, "error": {}}', '{"error": "x"}', '{"event": "X"}', '{"return": 1, "id": 2}']) {
      expect(parseAnswer(line).kind).toBe('invalid');
    }
  });

  it('an error description reaches us bounded and printable', () => {
    const a = parseAnswer(JSON.stringify({ error: { class: 'X\u001b[31m', desc: `\u001b]0;pwned\u0007${'y'.repeat(1000)}\nnext` } }));
    expect(a.kind).toBe('error');
    if (a.kind !== 'error') return;
    expect(a.desc.length).toBeLessThanOrEqual(121);
    expect(a.desc).not.toMatch(/[^\x20-\x7e…]/);
    expect(a.errorClass).toBe('X?[31m');
    expect(guestText('ok')).toBe('ok');
  });

  it('return shapes are checked, not assumed', () => {
    expect(isSyncAnswer(7, 7)).toBe(true);
    for (const v of [8, '7', null, { return: 7 }]) expect(isSyncAnswer(v, 7)).toBe(false);
    expect(isEmptyReturn({})).toBe(true);
    for (const v of [[], null, { a: 1 }, 0]) expect(isEmptyReturn(v)).toBe(false);
    expect(fileHandleOf(1000)).toBe(1000);
    for (const v of [-1, 1.5, '1', null, 2 ** 60]) expect(fileHandleOf(v)).toBeUndefined();
    expect(writtenCountOf({ count: 3, eof: false })).toBe(3);
    for (const v of [{ count: -1 }, { count: '3' }, 3, null]) expect(writtenCountOf(v)).toBeUndefined();
  });

  it('file reads: the base64 must be canonical and agree with the count and the limit', () => {
    const data = Buffer.from('PermitRootLogin yes\n');
    const b64 = data.toString('base64');
    expect(readBytesOf({ count: data.length, 'buf-b64': b64, eof: true }, 100)).toEqual({ data, eof: true });
    expect(readBytesOf({ count: 0, eof: true }, 100)).toEqual({ data: Buffer.alloc(0), eof: true });
    expect(readBytesOf({ count: data.length + 1, 'buf-b64': b64, eof: true }, 100)).toBeUndefined();
    expect(readBytesOf({ count: data.length, 'buf-b64': b64, eof: true }, data.length - 1)).toBeUndefined();
    expect(readBytesOf({ count: data.length, 'buf-b64': `${b64}!!`, eof: true }, 100)).toBeUndefined();
    expect(readBytesOf({ count: data.length, 'buf-b64': b64 }, 100)).toBeUndefined();
    expect(readBytesOf({ count: 4, 'buf-b64': 'A'.repeat(10_000), eof: true }, 100)).toBeUndefined();
  });
});

describe('withRootPasswordHash', () => {
  const shadow = 'root:!*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nsshd:!:19000::::::\n';

  it("sets root's hash and last-change day, keeps every other byte", () => {
    const out = withRootPasswordHash(shadow, HASH, 20_000)!;
    expect(out).toBe(`root:${HASH}:20000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nsshd:!:19000::::::\n`);
    expect(shadowDay(Date.UTC(2024, 0, 1, 23, 59))).toBe(19_723);
  });

  it('refuses files that are not one root entry among shadow(5) lines', () => {
    for (const bad of [
      '',
      'daemon:*:19000:0:99999:7:::\n',
      `${shadow}root:x:1:0:99999:7:::\n`,
      'root:!*:19000:0:99999:7:::',
      'root:!*:19000:0:99999:7::\n',
      'root:!*:19000:0:99999:7::::\n',
      'root:!*:19000:0:99999:7:::\n\n',
      'root:!*:19000:0:99999:7:::\r\n',
      'root:!*:19000:0:99999:7:::\n\u0000:x:1:::::::\n',
    ]) {
      expect(withRootPasswordHash(bad, HASH, 20_000), JSON.stringify(bad)).toBeUndefined();
    }
  });

  it('only a SHA-512 crypt hash goes in: a value with a colon or newline could add fields or users', () => {
    expect(() => withRootPasswordHash(shadow, 'plain:text', 20_000)).toThrow(RangeError);
    expect(() => withRootPasswordHash(shadow, `${HASH}\nmallory::0:0:99999:7:::`, 20_000)).toThrow(RangeError);
  });
});

describe('listensOnPort', () => {
  const header = '  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode';
  const line = (local: string, st: string) => `   0: ${local} 00000000:0000 ${st} 00000000:00000000 00:00000000 00000000     0        0 13007 1 0000000000000000 100 0 0 10 0`;

  it('a LISTEN socket on the port, any address, IPv4 or IPv6 table', () => {
    expect(listensOnPort([header, line('00000000:0016', '0A'), ''].join('\n'), 22)).toBe(true);
    expect(listensOnPort([header, line('0100007F:0016', '0A')].join('\n'), 22)).toBe(true);
    expect(listensOnPort([header, line('00000000000000000000000000000000:0016', '0A')].join('\n'), 22)).toBe(true);
  });

  it('not: another port, another state, the header, garbage', () => {
    expect(listensOnPort([header, line('00000000:0017', '0A')].join('\n'), 22)).toBe(false);
    expect(listensOnPort([header, line('0200000A:0016', '01')].join('\n'), 22)).toBe(false);
    expect(listensOnPort(`${line('00000000:0016', '0A')}`, 22)).toBe(false);
    for (const junk of ['', '\n\n', `${header}\n0: :0016 x 0A`, `${header}\n0: zz:0016 x 0A`, `${header}\n\u0000`]) expect(listensOnPort(junk, 22)).toBe(false);
  });
});

describe('GuestAgentSession.sync over a socket', () => {
  /** A qemu-ga stand-in that sends `early` as soon as a client connects, then answers each delimited sync correctly. */
  const delimited = (id: string | number) => Buffer.concat([Buffer.from([0xff]), Buffer.from(`{"return": ${id}}\n`)]);
  async function server(early: string, answer: (id: string) => Buffer = delimited): Promise<{ path: string; close: () => Promise<void>; sent: Promise<void> }> {
    const dir = mkdtempSync(join(tmpdir(), 'paygress-qga-'));
    const path = join(dir, 'qga.sock');
    let sent!: () => void;
    const sentP = new Promise<void>((r) => (sent = r));
    const socks = new Set<Socket>();
    const srv = createServer((sock) => {
      socks.add(sock);
      sock.on('error', () => undefined);
      sock.write(early, () => sent());
      let buf = '';
      sock.on('data', (chunk: Buffer) => {
        buf += chunk.toString('latin1');
        for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
          const id = /"id":\s*(\d+)/.exec(buf.slice(0, nl))?.[1];
          buf = buf.slice(nl + 1);
          if (id) sock.write(answer(id));
        }
      });
    });
    await new Promise<void>((r) => srv.listen(path, r));
    return {
      path,
      sent: sentP,
      close: async () => {
        for (const s of socks) s.destroy();
        await new Promise<void>((r) => srv.close(() => r()));
        rmSync(dir, { recursive: true, force: true });
      },
    };
  }

  it('drops lines that came before the sync (a late answer to an earlier command) instead of reading them as its answer', async () => {
    const qga = await server('{"return": {}}\n{"return": 12345}\n');
    try {
      const session = await GuestAgentSession.open(qga.path, { connectTimeoutMs: 5_000 });
      await qga.sent;
      // Let the early bytes reach the session before the sync is sent.
      await new Promise((r) => setTimeout(r, 100));
      await expect(session.sync(5_000)).resolves.toBeUndefined();
      session.close();
    } finally {
      await qga.close();
    }
  });

  it('skips a late answer to an earlier sync of ours that arrives in the same chunk as the real one', async () => {
    const qga = await server('', (id) => Buffer.concat([delimited(777), delimited(id)]));
    try {
      const session = await GuestAgentSession.open(qga.path, { connectTimeoutMs: 5_000 });
      await expect(session.sync(2_000, new Set([777]))).resolves.toBeUndefined();
      session.close();
    } finally {
      await qga.close();
    }
  });

  it('a flood of unasked lines ends the session as a lie', async () => {
    const qga = await server('{"return": {}}\n'.repeat(200));
    try {
      const session = await GuestAgentSession.open(qga.path, { connectTimeoutMs: 5_000 });
      await qga.sent;
      await new Promise((r) => setTimeout(r, 100));
      await expect(session.sync(5_000)).rejects.toMatchObject({ reason: 'lie' });
    } finally {
      await qga.close();
    }
  });
});
