import { describe, expect, it } from 'vitest';
import { parse as parse12, parseDocument } from 'yaml';
import {
  buildCloudConfig,
  cloudConfigObject,
  finalMessageFor,
  metaDataObject,
  SEED_YAML_OPTIONS,
  SSHD_DROPIN_PATH,
  type CloudConfigInput,
} from '../../src/drivers/kvm/cloud-config.js';
import { sha512crypt } from '../../src/util/sha512crypt.js';

// cloud-init parses with PyYAML (YAML 1.1); read the output the same way.
const parse = (s: string) => parse12(s, { version: '1.1' });

const PASSWORD = 'Plaintext-Secret-42';
const HASH = sha512crypt(PASSWORD, 'abcdefgh12345678');

function input(over: Partial<CloudConfigInput> = {}): CloudConfigInput {
  return {
    hostname: 'vm-abc123',
    passwordHash: HASH,
    sshKeys: ['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB3Zk6Ue1hXv5vJXxvO4O0L0x0E0bq5D3dQn3yV6m6m1 user@host'],
    finalMessageToken: 'tok_0123456789abcdef',
    instanceId: 'paygress-vm-abc123-6f1c',
    ...over,
  };
}

describe('buildCloudConfig', () => {
  it('produces #cloud-config YAML that parses back to exactly the intended object', () => {
    const i = input();
    const { userData, metaData } = buildCloudConfig(i);
    expect(userData.startsWith('#cloud-config\n')).toBe(true);
    expect(parse(userData)).toEqual(cloudConfigObject(i));
    expect(parse(metaData)).toEqual({ 'instance-id': i.instanceId, 'local-hostname': i.hostname });
    expect(parse(metaData)).toEqual(metaDataObject(i));
  });

  it('contains everything root password login needs, and only the hash', () => {
    const cfg = parse(buildCloudConfig(input()).userData);
    expect(cfg.chpasswd).toEqual({ expire: false, users: [{ name: 'root', password: HASH, type: 'hash' }] });
    expect(cfg.ssh_pwauth).toBe(true);
    expect(cfg.disable_root).toBe(false);
    expect(cfg.preserve_hostname).toBe(false);
    expect(cfg.hostname).toBe('vm-abc123');
    expect(cfg.write_files).toEqual([
      expect.objectContaining({ path: SSHD_DROPIN_PATH, content: 'PermitRootLogin yes\nPasswordAuthentication yes\n' }),
    ]);
    expect(cfg.users).toEqual([{ name: 'root', lock_passwd: false, ssh_authorized_keys: input().sshKeys }]);
    expect(cfg.ssh_genkeytypes).toEqual(['ed25519', 'ecdsa']);
    expect(cfg.final_message).toContain(finalMessageFor('tok_0123456789abcdef'));
  });

  it('omits ssh_authorized_keys when there are no keys', () => {
    const cfg = parse(buildCloudConfig(input({ sshKeys: [] })).userData);
    expect(cfg.users).toEqual([{ name: 'root', lock_passwd: false }]);
  });

  it('never contains the plaintext password', () => {
    const { userData, metaData } = buildCloudConfig(input());
    expect(userData).not.toContain(PASSWORD);
    expect(metaData).not.toContain(PASSWORD);
  });

  it('hostile hostnames and keys stay inside their own values (no key injection)', () => {
    const evilHost = 'h\nssh_pwauth: false\nruncmd: [["sh","-c","id"]]\n# "quoted": \'x\' #';
    const evilKey = 'ssh-ed25519 AAAA x"\n  - name: mallory\nbootcmd: [reboot] # \': "';
    const i = input({ hostname: evilHost, sshKeys: [evilKey, 'key: with: colons'], instanceId: 'id\n"x": y' });
    const { userData, metaData } = buildCloudConfig(i);
    const doc = parseDocument(userData, SEED_YAML_OPTIONS);
    expect(doc.errors).toEqual([]);
    const cfg = doc.toJS();
    // Exactly our keys, with the hostile strings preserved verbatim as values.
    expect(Object.keys(cfg).sort()).toEqual(Object.keys(cloudConfigObject(i)).sort());
    expect(cfg).toEqual(cloudConfigObject(i));
    expect(cfg.hostname).toBe(evilHost);
    expect(cfg.ssh_pwauth).toBe(true);
    expect(cfg.runcmd).toBeUndefined();
    expect(cfg.bootcmd).toBeUndefined();
    expect(cfg.users).toHaveLength(1);
    expect(cfg.users[0].ssh_authorized_keys).toEqual([evilKey, 'key: with: colons']);
    const meta = parse(metaData);
    expect(Object.keys(meta).sort()).toEqual(['instance-id', 'local-hostname']);
    expect(meta['local-hostname']).toBe(evilHost);
  });

  it('keeps YAML 1.1 booleans and octal-looking strings as strings', () => {
    const i = input({ hostname: 'yes', sshKeys: ['on', '0644'], instanceId: 'off' });
    const { userData, metaData } = buildCloudConfig(i);
    expect(parse(userData)).toEqual(cloudConfigObject(i));
    expect(parse(metaData)).toEqual(metaDataObject(i));
  });

  it('refuses a plaintext password in the hash slot and a token that cloud-init would template', () => {
    expect(() => buildCloudConfig(input({ passwordHash: PASSWORD }))).toThrow(RangeError);
    expect(() => buildCloudConfig(input({ finalMessageToken: 'abc$version123' }))).toThrow(RangeError);
  });
});
