/**
 * Pure NoCloud seed content builder. The cloud-config is built as a plain JS
 * object and serialised with the `yaml` package, so no input (hostname, key,
 * hash) can ever add or change keys: the serializer quotes whatever it needs.
 * Only the SHA-512 crypt hash of the root password goes in; the plaintext
 * never reaches this module.
 */
import { stringify } from 'yaml';

export interface CloudConfigInput {
  hostname: string;
  /** `$6$...` SHA-512 crypt hash of the root password. */
  passwordHash: string;
  /** OpenSSH public keys for root (one line each). */
  sshKeys: string[];
  /** Printed by cloud-init in its final message on the serial console, so the agent can see it finish. */
  finalMessageToken: string;
  /** NoCloud instance-id; must be unique per workload so cloud-init runs its first-boot modules. */
  instanceId: string;
  /** Static guest network (tap mode); absent: the image's default (DHCP / user-mode network). */
  network?: GuestNetwork;
}

/** One NIC, found by its MAC, with a fixed address, default route and resolver. */
export interface GuestNetwork {
  mac: string;
  /** `a.b.c.d/len` */
  address: string;
  gateway: string;
  dns: string;
}

export interface SeedFiles {
  userData: string;
  metaData: string;
  /** NoCloud `network-config` (version 2), when the guest gets a static network. */
  networkConfig?: string;
}

/**
 * sshd keeps the FIRST value it reads for a keyword and Debian's sshd_config
 * includes sshd_config.d/*.conf at its top, in lexical order. A name sorting
 * early beats drop-ins images ship (Ubuntu's `60-cloudimg-settings.conf` says
 * `PasswordAuthentication no`), hence `10-`, not `60-`.
 */
export const SSHD_DROPIN_PATH = '/etc/ssh/sshd_config.d/10-paygress-root.conf';
export const SSHD_DROPIN_CONTENT = 'PermitRootLogin yes\nPasswordAuthentication yes\n';

/** The marker line prefix the agent looks for in serial.log. */
export const FINAL_MESSAGE_PREFIX = 'paygress-cloud-init-done';

const TOKEN_RE = /^[A-Za-z0-9_-]{8,128}$/;
/** A SHA-512 crypt hash (`$6$`), the only form a root password reaches a guest in. */
export const SHA512_CRYPT_RE = /^\$6\$(rounds=\d+\$)?[./0-9A-Za-z]{1,16}\$[./0-9A-Za-z]{86}$/;

/** The line cloud-init will print on the console when done, for a given token. */
export function finalMessageFor(token: string): string {
  return `${FINAL_MESSAGE_PREFIX} ${token}`;
}

/** What an idle warm-pool VM's seed is built from: no password, no keys (root stays locked until the hand-off). */
export type IdleCloudConfigInput = Omit<CloudConfigInput, 'passwordHash' | 'sshKeys'>;

/** What cold and idle VMs share: hostname, sshd open to root password login, host key types, the final message. */
function commonCloudConfig(input: IdleCloudConfigInput): Record<string, unknown> {
  // final_message goes through cloud-init's `$var` templating: keep the token inert.
  if (!TOKEN_RE.test(input.finalMessageToken)) throw new RangeError('finalMessageToken must match [A-Za-z0-9_-]{8,128}');
  return {
    hostname: input.hostname,
    preserve_hostname: false,
    disable_root: false,
    ssh_pwauth: true,
    // Stock Debian sshd says PermitRootLogin prohibit-password; write_files
    // runs in cloud-init's init stage, before sshd starts.
    write_files: [
      { path: SSHD_DROPIN_PATH, owner: 'root:root', permissions: '0644', content: SSHD_DROPIN_CONTENT },
    ],
    // RSA host key generation is the slowest step of a first boot under TCG (docs/driver.md).
    ssh_genkeytypes: ['ed25519', 'ecdsa'],
    final_message: `${finalMessageFor(input.finalMessageToken)} cloud-init $version finished at $timestamp, up $uptime s`,
  };
}

/** The cloud-config as an object; exported so tests can compare the YAML round trip against it. */
export function cloudConfigObject(input: CloudConfigInput): Record<string, unknown> {
  // These two are ours, not the consumer's: a wrong shape is a programming error.
  if (!SHA512_CRYPT_RE.test(input.passwordHash)) throw new RangeError('passwordHash must be a SHA-512 crypt hash');
  const common = commonCloudConfig(input);
  const root: Record<string, unknown> = { name: 'root', lock_passwd: false };
  if (input.sshKeys.length > 0) root.ssh_authorized_keys = [...input.sshKeys];
  return {
    ...common,
    // A users list without `default`: no image default user (e.g. `debian`)
    // is created, so no second sudo-capable account exists. For an existing
    // user cloud-init 22.4's create_user skips useradd but still installs
    // `ssh_authorized_keys` and honours lock_passwd; top-level
    // `ssh_authorized_keys` would go to the default user as well.
    users: [root],
    // expire: false, else the first login fails with "Password change required but no TTY".
    chpasswd: { expire: false, users: [{ name: 'root', password: input.passwordHash, type: 'hash' }] },
  };
}

/**
 * An idle warm-pool VM: the same sshd settings as a cold VM, but root's
 * password locked and no keys, so nobody can log in until the hand-off sets
 * both through the guest agent. No default user either.
 */
export function idleCloudConfigObject(input: IdleCloudConfigInput): Record<string, unknown> {
  return { ...commonCloudConfig(input), users: [{ name: 'root', lock_passwd: true }] };
}

/**
 * NoCloud network-config, version 2 (cloud-init 22.4 renders it for ifupdown,
 * netplan or networkd alike). Matched by MAC: the NIC's name differs between
 * images. `set-name` is what makes cloud-init rename the matched NIC: without
 * it, its networkd renderer matches on the config's key as the interface name
 * too (`Name=net0`), and its ifupdown renderer configures an interface called
 * `net0`; neither exists, and the guest would have no network.
 */
export function networkConfigObject(net: GuestNetwork): Record<string, unknown> {
  return {
    version: 2,
    ethernets: {
      net0: {
        match: { macaddress: net.mac },
        'set-name': 'eth0',
        addresses: [net.address],
        routes: [{ to: '0.0.0.0/0', via: net.gateway }],
        nameservers: { addresses: [net.dns] },
      },
    },
  };
}

export function metaDataObject(input: Pick<CloudConfigInput, 'instanceId' | 'hostname'>): Record<string, unknown> {
  return { 'instance-id': input.instanceId, 'local-hostname': input.hostname };
}

// cloud-init reads YAML 1.1 (PyYAML), where bare `yes`/`no`/`on`/`off` are
// booleans and `0644` is octal: serialise as 1.1 so such strings get quoted.
// lineWidth 0: never fold long lines (ssh keys).
export const SEED_YAML_OPTIONS = { version: '1.1', lineWidth: 0 } as const;

export function buildCloudConfig(input: CloudConfigInput): SeedFiles {
  return seedFiles(cloudConfigObject(input), input);
}

export function buildIdleCloudConfig(input: IdleCloudConfigInput): SeedFiles {
  return seedFiles(idleCloudConfigObject(input), input);
}

function seedFiles(userData: Record<string, unknown>, input: IdleCloudConfigInput): SeedFiles {
  return {
    userData: `#cloud-config\n${stringify(userData, SEED_YAML_OPTIONS)}`,
    metaData: stringify(metaDataObject(input), SEED_YAML_OPTIONS),
    ...(input.network ? { networkConfig: stringify(networkConfigObject(input.network), SEED_YAML_OPTIONS) } : {}),
  };
}
