/**
 * The hostile-input corpus: a real agent (child process) on a real relay gets
 * hundreds of DMs meant to break it — generated with fast-check (seeded, so a
 * failure reproduces) and picked by hand. Afterwards the agent must still run,
 * every answerable request must have exactly one error reply with the
 * expected code, nothing may have been created on the host, and no secret
 * planted in the corpus may appear in the agent's output or state files.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createCipheriv, createECDH, randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import WebSocket from 'ws';
import { finalizeEvent, generateSecretKey, getEventHash, getPublicKey } from 'nostr-tools';
import * as nip04 from 'nostr-tools/nip04';
import * as nip44 from 'nostr-tools/nip44';
import { ConsumerClient, type ReplyMessage } from '../../src/client/consumer.js';
import { sealDmRequest } from '../../src/nostr/dm.js';
import type { NostrEvent } from '../../src/nostr/types.js';
import type { ErrorCode } from '../../src/protocol/errors.js';
import { startRelay, type LocalRelay } from '../support/relay.js';
import { ensureTinyGuest } from '../support/tiny-guest.js';
import { startAgentProcess, type AgentProcess } from '../support/agent-process.js';
import { isFree, qemuPidsMatching, until } from '../support/net.js';
import { filesUnder } from '../support/files.js';

const PORTS = { from: 45000, to: 45009 };
const MAX_CONTENT = 16_384;
const SEED = 0x5eed_2024;
const SENDERS_PER_CHANNEL = 4;

let relay: LocalRelay;
let agent: AgentProcess;

type Channel = 'nip17' | 'nip04';
interface Sender {
  sk: Uint8Array;
  pubkey: string;
  channel: Channel;
  client: ConsumerClient;
}
const senders: Sender[] = [];
/** Every reply any of our keys received, by the request it names. */
const replies = new Map<string, ReplyMessage[]>();
let unnamedReplies = 0;

/** Secrets planted in the corpus: none may show up in logs, state files or replies. */
const secrets = new Set<string>();
function secret(): string {
  const s = `SECRET${randomBytes(8).toString('hex')}`;
  secrets.add(s);
  return s;
}

// --- the corpus ------------------------------------------------------------------

/** A DM whose sender is authentic and whose content decrypts: it deserves an answer. */
interface Answerable {
  name: string;
  content: string;
  expect: ErrorCode;
  channel?: Channel;
}

const HOSTILE_STRINGS = [
  '../../../../etc/passwd',
  '..\\..\\..\\windows\\system32',
  '/etc/shadow',
  '/proc/self/environ',
  '-daemonize',
  '--help',
  '-drive file=/etc/shadow,if=virtio',
  ',file=/etc/passwd',
  'a,,b=c',
  '$(reboot)',
  '`id`',
  '; rm -rf / #',
  '| cat /etc/shadow',
  '\n- name: root\n  lock_passwd: false',
  'w-000000000000/../../x',
  'w-000000000000\n',
  ' w-000000000000',
  'w-00000000000g',
  'W-000000000000',
  '%2e%2e%2f%2e%2e%2f',
  '\u202egpj.exe',
  'ѕpawn', // Cyrillic s
  'spawn\u200b',
  'ｓｔａｔｕｓ',
  'w-０００００００００００',
  '\u0000',
  '\ud800',
  '{{7*7}}',
  '${jndi:ldap://127.0.0.1/a}',
  '__proto__',
  'constructor',
  'null',
  '',
  ' '.repeat(300),
  'x'.repeat(5000),
];

const hostileString = fc.oneof(
  fc.constantFrom(...HOSTILE_STRINGS),
  fc.string({ maxLength: 80 }),
  fc.string({ unit: 'grapheme', maxLength: 40 }),
  fc.string({ unit: 'binary', maxLength: 40 }),
);
const notAString = fc.oneof(
  fc.integer(),
  fc.double(),
  fc.boolean(),
  fc.constant(null),
  fc.array(fc.jsonValue({ maxDepth: 2 }), { maxLength: 4 }),
  fc.dictionary(fc.string({ maxLength: 8 }), fc.jsonValue({ maxDepth: 2 }), { maxKeys: 4 }),
);
const notAnInt = fc.oneof(
  hostileString,
  fc.double().filter((d) => !Number.isInteger(d)),
  fc.integer({ max: 0 }),
  fc.integer({ min: 1_048_577 }).map((n) => n * 1000),
  fc.constant(null),
  fc.boolean(),
  fc.array(fc.integer(), { maxLength: 3 }),
);
const WORKLOAD_ID = /^w-[0-9a-f]{12}$/;
const PLAN_ID = /^[a-z0-9][a-z0-9-]{0,31}$/;

/** A spawn with exactly one field made invalid; everything else is well formed. */
function badSpawn(): fc.Arbitrary<Answerable> {
  const bad: Record<string, fc.Arbitrary<unknown>> = {
    root_password: fc.oneof(
      notAString,
      fc.string({ maxLength: 11 }),
      // Control characters (YAML/newline injection) are refused whatever else the text holds.
      fc.tuple(hostileString, fc.constantFrom('\n', '\r', '\t', '\u0000', '\u001b', '\u007f')).map(([s, c]) => `${s}pppppppppppp${c}`),
      fc.string({ minLength: 257, maxLength: 400 }),
    ),
    plan: fc.oneof(notAString, hostileString.filter((s) => !PLAN_ID.test(s))),
    vcpus: notAnInt,
    memory_mb: notAnInt,
    disk_gb: notAnInt,
    isolation: fc.oneof(notAString, hostileString),
    ssh_keys: fc.oneof(
      notAString.filter((v) => !Array.isArray(v)),
      fc.array(hostileString, { minLength: 1, maxLength: 3 }),
      fc.constant(Array.from({ length: 17 }, () => validSshKey())),
    ),
    version: fc.oneof(fc.integer().filter((n) => n !== 1), hostileString, fc.constant(null)),
  };
  return fc
    .tuple(fc.constantFrom(...Object.keys(bad)), fc.constantFrom('cashu_token', 'ssh_password', 'token', 'nsec', 'note'))
    .chain(([field, extra]) =>
      bad[field]!.map((value) => {
        const body: Record<string, unknown> = { type: 'spawn', root_password: secret(), [extra]: secret(), [field]: value };
        return { name: `spawn with bad ${field}`, content: JSON.stringify(body), expect: 'invalid_request' as const };
      }),
    );
}

function badStopStatus(): fc.Arbitrary<Answerable> {
  return fc.tuple(fc.constantFrom('stop', 'status'), fc.oneof(notAString, hostileString.filter((s) => !WORKLOAD_ID.test(s)))).map(
    ([type, id]) => ({
      name: `${type} with bad workload_id`,
      content: JSON.stringify({ type, workload_id: id, token: secret() }),
      expect: 'invalid_request' as const,
    }),
  );
}

/** Well-formed stop/status for ids that do not exist: `not_found`, nothing else. */
function unknownWorkload(): fc.Arbitrary<Answerable> {
  return fc
    .tuple(fc.constantFrom('stop', 'status'), fc.stringMatching(/^[0-9a-f]{12}$/))
    .map(([type, hex]) => ({ name: `${type} unknown id`, content: JSON.stringify({ type, workload_id: `w-${hex}`, note: secret() }), expect: 'not_found' as const }));
}

function notJsonObject(): fc.Arbitrary<Answerable> {
  const notObject = (s: string): boolean => {
    try {
      const v: unknown = JSON.parse(s);
      return typeof v !== 'object' || v === null || Array.isArray(v);
    } catch {
      return true;
    }
  };
  return fc
    .oneof(
      fc.string({ maxLength: 200 }),
      fc.string({ unit: 'binary', maxLength: 200 }),
      fc.jsonValue({ maxDepth: 3 }).map((v) => JSON.stringify(v) ?? 'undefined'),
    )
    .map((s) => `${s}${s.length % 2 ? '' : secret()}`)
    .filter(notObject)
    .map((content) => {
      // Plant a secret in every item, even where the generator left none.
      const c = content.includes('SECRET') ? content : `${content}${secret()}`;
      return { name: 'not a JSON object', content: notObject(c) ? c : `${c}}`, expect: 'invalid_request' as const };
    });
}

function wrongType(): fc.Arbitrary<Answerable> {
  return fc
    .tuple(fc.oneof(notAString, hostileString.filter((s) => !['spawn', 'stop', 'status'].includes(s))), fc.boolean())
    .map(([type, withType]) => {
      const body: Record<string, unknown> = { workload_id: 'w-000000000000', root_password: secret() };
      if (withType) body.type = type;
      return { name: 'bad or missing type', content: JSON.stringify(body), expect: 'invalid_request' as const };
    });
}

function generated(): Answerable[] {
  const arb = fc.oneof(
    { arbitrary: badSpawn(), weight: 5 },
    { arbitrary: badStopStatus(), weight: 2 },
    { arbitrary: unknownWorkload(), weight: 1 },
    { arbitrary: notJsonObject(), weight: 2 },
    { arbitrary: wrongType(), weight: 2 },
  );
  return fc.sample(arb, { seed: SEED, numRuns: 200 });
}

/** A well-formed ed25519 authorized_keys line (random key). */
function validSshKey(): string {
  const len = (b: Buffer) => {
    const l = Buffer.alloc(4);
    l.writeUInt32BE(b.length);
    return Buffer.concat([l, b]);
  };
  return `ssh-ed25519 ${Buffer.concat([len(Buffer.from('ssh-ed25519')), len(randomBytes(32))]).toString('base64')} me@host`;
}

function deepArray(depth: number): string {
  return `${'['.repeat(depth)}${']'.repeat(depth)}`;
}
function deepObject(depth: number): string {
  return `${'{"a":'.repeat(depth)}1${'}'.repeat(depth)}`;
}

function handPicked(): Answerable[] {
  const s = () => secret();
  const key = validSshKey();
  const list: Array<[string, string, ErrorCode, Channel?]> = [
    ['empty', '', 'invalid_request'],
    ['whitespace', ' \n\t ', 'invalid_request'],
    ['null', 'null', 'invalid_request'],
    ['array', `["${s()}"]`, 'invalid_request'],
    ['string', `"${s()}"`, 'invalid_request'],
    ['number', '1e999', 'invalid_request'],
    ['truncated', `{"type":"spawn","root_password":"${s()}`, 'invalid_request'],
    ['trailing garbage', `{"type":"status","workload_id":"w-000000000000"} ${s()}`, 'invalid_request'],
    ['BOM before JSON', `\ufeff{"type":"status","workload_id":"w-000000000000","x":"${s()}"}`, 'invalid_request'],
    ['single quotes', `{'type':'status','workload_id':'w-000000000000','x':'${s()}'}`, 'invalid_request'],
    ['comments', `{"type":"status", /* ${s()} */ "workload_id":"w-000000000000"}`, 'invalid_request'],
    ['NaN', `{"type":"spawn","root_password":"${s()}","vcpus":NaN}`, 'invalid_request'],
    ['missing password', `{"type":"spawn","note":"${s()}"}`, 'invalid_request'],
    ['short password', JSON.stringify({ type: 'spawn', root_password: 'short', note: s() }), 'invalid_request'],
    ['password with newline (YAML injection)', JSON.stringify({ type: 'spawn', root_password: `${s()}\nruncmd: [reboot]` }), 'invalid_request'],
    ['password with NUL', JSON.stringify({ type: 'spawn', root_password: `${s()}\u0000tail` }), 'invalid_request'],
    ['password with ESC', JSON.stringify({ type: 'spawn', root_password: `${s()}\u001b[2J` }), 'invalid_request'],
    // Duplicate keys: JSON.parse keeps the last one; no earlier value may leak through.
    ['duplicate type', `{"type":"status","type":"spawn","root_password":"${s()}","vcpus":"1"}`, 'invalid_request'],
    ['duplicate id, bad last', `{"type":"status","workload_id":"w-000000000000","workload_id":"../../../etc/passwd","t":"${s()}"}`, 'invalid_request'],
    ['duplicate id, good last', `{"type":"status","workload_id":"../../../etc/passwd","workload_id":"w-000000000000","t":"${s()}"}`, 'not_found'],
    ['duplicate password, bad last', `{"type":"spawn","root_password":"${s()}","root_password":7}`, 'invalid_request'],
    ['__proto__ smuggling', `{"__proto__":{"type":"status"},"workload_id":"w-000000000000","t":"${s()}"}`, 'invalid_request'],
    ['__proto__ password', `{"type":"spawn","__proto__":{"root_password":"${s()}"}}`, 'invalid_request'],
    ['constructor key', `{"type":"spawn","constructor":{"prototype":{"root_password":"${s()}"}}}`, 'invalid_request'],
    ['homoglyph type', JSON.stringify({ type: 'ѕtatus', workload_id: 'w-000000000000', t: s() }), 'invalid_request'],
    ['zero-width type', JSON.stringify({ type: 'status\u200b', workload_id: 'w-000000000000', t: s() }), 'invalid_request'],
    ['fullwidth digits id', JSON.stringify({ type: 'status', workload_id: 'w-００００００００００００', t: s() }), 'invalid_request'],
    ['RTL override id', JSON.stringify({ type: 'stop', workload_id: 'w-\u202e000000000000', t: s() }), 'invalid_request'],
    ['lone surrogate escapes', `{"type":"stop","workload_id":"w-\\ud800\\udfff\\ud800","t":"${s()}"}`, 'invalid_request'],
    ['uppercase hex id', JSON.stringify({ type: 'status', workload_id: 'w-ABCDEF012345', t: s() }), 'invalid_request'],
    ['id with newline', JSON.stringify({ type: 'stop', workload_id: 'w-000000000000\n', t: s() }), 'invalid_request'],
    ['id traversal', JSON.stringify({ type: 'stop', workload_id: '../w-000000000000', t: s() }), 'invalid_request'],
    ['id option', JSON.stringify({ type: 'stop', workload_id: '-rf', t: s() }), 'invalid_request'],
    ['plan traversal', JSON.stringify({ type: 'spawn', root_password: s(), plan: '../../etc' }), 'invalid_request'],
    ['plan option', JSON.stringify({ type: 'spawn', root_password: s(), plan: '--help' }), 'invalid_request'],
    ['plan unknown but well-formed', JSON.stringify({ type: 'spawn', root_password: s(), plan: 'nope' }), 'unknown_plan'],
    ['isolation injection', JSON.stringify({ type: 'spawn', root_password: s(), isolation: 'dedicated-host;reboot' }), 'invalid_request'],
    ['isolation not offered', JSON.stringify({ type: 'spawn', root_password: s(), isolation: 'attested-research-tier' }), 'isolation_unavailable'],
    ['memory over plan', JSON.stringify({ type: 'spawn', root_password: s(), memory_mb: 4096 }), 'exceeds_plan'],
    ['vcpus over plan', JSON.stringify({ type: 'spawn', root_password: s(), vcpus: 64 }), 'exceeds_plan'],
    ['disk over plan', JSON.stringify({ type: 'spawn', root_password: s(), disk_gb: 1000 }), 'exceeds_plan'],
    ['negative vcpus', JSON.stringify({ type: 'spawn', root_password: s(), vcpus: -1 }), 'invalid_request'],
    ['float memory', JSON.stringify({ type: 'spawn', root_password: s(), memory_mb: 256.5 }), 'invalid_request'],
    ['huge number', `{"type":"spawn","root_password":"${s()}","disk_gb":1${'0'.repeat(400)}}`, 'invalid_request'],
    ['version 2', JSON.stringify({ type: 'status', version: 2, workload_id: 'w-000000000000', t: s() }), 'invalid_request'],
    // Passwords are only ever hashed: traversal text in one is harmless, and a
    // request that fails later for another reason must still not spawn or leak it.
    ['traversal password, unknown plan', JSON.stringify({ type: 'spawn', root_password: `../../../../etc/shadow${s()}`, plan: 'zzz' }), 'unknown_plan'],
    ['option password, isolation', JSON.stringify({ type: 'spawn', root_password: `--password=${s()}`, isolation: 'attested-research-tier' }), 'isolation_unavailable'],
    ['shell password, over plan', JSON.stringify({ type: 'spawn', root_password: `$(reboot)${s()}`, vcpus: 99 }), 'exceeds_plan'],
    // Hostile ids/hostnames/paths in fields the agent never reads do not help the request along.
    ['hostile hostname + bad vcpus', JSON.stringify({ type: 'spawn', root_password: s(), hostname: '../../etc', id: '-daemonize', path: '/etc', vcpus: 'x' }), 'invalid_request'],
    ['ssh key with options prefix', JSON.stringify({ type: 'spawn', root_password: s(), ssh_keys: [`command="reboot" ${key}`] }), 'invalid_request'],
    ['ssh key with newline', JSON.stringify({ type: 'spawn', root_password: s(), ssh_keys: [`${key}\nssh-ed25519 AAAA`] }), 'invalid_request'],
    ['ssh key, option word', JSON.stringify({ type: 'spawn', root_password: s(), ssh_keys: [`-oProxyCommand=sh ${key}`] }), 'invalid_request'],
    ['ssh key, bad base64', JSON.stringify({ type: 'spawn', root_password: s(), ssh_keys: ['ssh-ed25519 AAAA$$$$ x'] }), 'invalid_request'],
    ['ssh key, type mismatch', JSON.stringify({ type: 'spawn', root_password: s(), ssh_keys: [key.replace('ssh-ed25519 ', 'ssh-rsa ')] }), 'invalid_request'],
    ['ssh keys not array', JSON.stringify({ type: 'spawn', root_password: s(), ssh_keys: key }), 'invalid_request'],
    ['deep array', deepArray(7000), 'invalid_request'],
    ['deep object', deepObject(2500), 'invalid_request'],
    ['deep extra in spawn', `{"type":"spawn","note":"${s()}","x":${deepArray(5000)}}`, 'invalid_request'],
    ['deep password', `{"type":"spawn","t":"${s()}","root_password":${deepObject(2000)}}`, 'invalid_request'],
    ['many keys', JSON.stringify({ type: 'spawn', t: s(), ...Object.fromEntries(Array.from({ length: 1200 }, (_, i) => [`k${i}`, i])) }), 'invalid_request'],
    ['oversize over NIP-17', JSON.stringify({ type: 'spawn', root_password: s(), pad: 'x'.repeat(MAX_CONTENT + 100) }), 'invalid_request', 'nip17'],
    ['oversize over NIP-04', JSON.stringify({ type: 'spawn', root_password: s(), pad: 'y'.repeat(70_000) }), 'invalid_request', 'nip04'],
    ['oversize multibyte', JSON.stringify({ type: 'status', workload_id: 'w-000000000000', t: s(), pad: '€'.repeat(6000) }), 'invalid_request', 'nip17'],
  ];
  return list.map(([name, content, code, channel]) => ({ name, content, expect: code, ...(channel ? { channel } : {}) }));
}

// --- raw events: the hostile side built by hand ----------------------------------

function rumorOf(pubkey: string, content: string, kind = 14) {
  const r = { kind, pubkey, created_at: Math.floor(Date.now() / 1000), tags: [['p', agent.pubkey]], content };
  return { ...r, id: getEventHash(r) };
}

function sealOf(sealer: Uint8Array, recipient: string, rumor: object, kind = 13): NostrEvent {
  return finalizeEvent(
    { kind, created_at: Math.floor(Date.now() / 1000), tags: [], content: nip44.encrypt(JSON.stringify(rumor), nip44.getConversationKey(sealer, recipient)) },
    sealer,
  ) as NostrEvent;
}

function wrapOf(seal: object | string, recipient: string, tagFor = recipient): NostrEvent {
  const ephemeral = generateSecretKey();
  const plaintext = typeof seal === 'string' ? seal : JSON.stringify(seal);
  return finalizeEvent(
    { kind: 1059, created_at: Math.floor(Date.now() / 1000), tags: [['p', tagFor]], content: nip44.encrypt(plaintext, nip44.getConversationKey(ephemeral, recipient)) },
    ephemeral,
  ) as NostrEvent;
}

/** A NIP-04 event from `sk` with a hand-made payload (bad IV, bad padding, ...). */
function nip04Raw(sk: Uint8Array, payload: string): NostrEvent {
  return finalizeEvent({ kind: 4, created_at: Math.floor(Date.now() / 1000), tags: [['p', agent.pubkey]], content: payload }, sk) as NostrEvent;
}

/** AES-256-CBC under the real NIP-04 key with the padding left wrong on purpose. */
function nip04BadPadding(sk: Uint8Array, plaintext: string, lastByte: number): string {
  // NIP-04's key: the x coordinate of the ECDH point, unhashed.
  const shared = sharedX(sk, agent.pubkey);
  const iv = randomBytes(16);
  const body = Buffer.from(plaintext, 'utf8');
  const padded = Buffer.concat([body, Buffer.alloc(16 - (body.length % 16), 0)]);
  padded[padded.length - 1] = lastByte;
  const c = createCipheriv('aes-256-cbc', shared, iv).setAutoPadding(false);
  const ct = Buffer.concat([c.update(padded), c.final()]);
  return `${ct.toString('base64')}?iv=${iv.toString('base64')}`;
}

function sharedX(sk: Uint8Array, pubHex: string): Buffer {
  const ecdh = createECDH('secp256k1');
  ecdh.setPrivateKey(Buffer.from(sk));
  return ecdh.computeSecret(Buffer.from(`02${pubHex}`, 'hex')).subarray(0, 32);
}

interface Unanswerable {
  name: string;
  event: NostrEvent;
  /** Id a reply would name, if the agent (wrongly) answered. */
  wouldName?: string;
}

function unanswerable(): Unanswerable[] {
  const out: Unanswerable[] = [];
  const a = senders[0]!;
  const b = senders[1]!;
  const statusBody = () => JSON.stringify({ type: 'status', workload_id: 'w-000000000000', t: secret() });

  // Forged sender: seal signed by a stranger, rumor claims to be our client.
  for (let i = 0; i < 5; i++) {
    const rumor = rumorOf(a.pubkey, statusBody());
    out.push({ name: 'forged sender', event: wrapOf(sealOf(generateSecretKey(), agent.pubkey, rumor), agent.pubkey), wouldName: rumor.id });
  }
  // Seal whose signature does not match (content swapped after signing).
  {
    const rumor = rumorOf(a.pubkey, statusBody());
    const seal = sealOf(a.sk, agent.pubkey, rumor);
    const other = sealOf(a.sk, agent.pubkey, rumorOf(a.pubkey, statusBody()));
    out.push({ name: 'seal with bad signature', event: wrapOf({ ...seal, content: other.content }, agent.pubkey), wouldName: rumor.id });
    const flipped = seal.sig.slice(0, -1) + (seal.sig.endsWith('0') ? '1' : '0');
    out.push({ name: 'seal with flipped sig', event: wrapOf({ ...seal, sig: flipped }, agent.pubkey), wouldName: rumor.id });
  }
  // Rumor and seal of the wrong kinds.
  {
    const r1 = rumorOf(a.pubkey, statusBody(), 1);
    out.push({ name: 'rumor kind 1', event: wrapOf(sealOf(a.sk, agent.pubkey, r1), agent.pubkey), wouldName: r1.id });
    const r2 = rumorOf(a.pubkey, statusBody());
    out.push({ name: 'seal kind 1', event: wrapOf(sealOf(a.sk, agent.pubkey, r2, 1), agent.pubkey), wouldName: r2.id });
  }
  // Rumor whose id does not match its content.
  {
    const r = rumorOf(a.pubkey, statusBody());
    out.push({ name: 'rumor id mismatch', event: wrapOf(sealOf(a.sk, agent.pubkey, { ...r, content: statusBody() }), agent.pubkey), wouldName: r.id });
  }
  // Wraps whose inner layers are not what they claim.
  out.push({ name: 'wrap holding garbage', event: wrapOf(`not json ${secret()}`, agent.pubkey) });
  out.push({ name: 'wrap holding an array', event: wrapOf(`[1,2,"${secret()}"]`, agent.pubkey) });
  out.push({ name: 'wrap holding a bare rumor', event: wrapOf(rumorOf(a.pubkey, statusBody()), agent.pubkey) });
  // Tagged for the agent but encrypted to someone else.
  {
    const other = getPublicKey(generateSecretKey());
    const r = rumorOf(a.pubkey, statusBody());
    out.push({ name: 'wrap encrypted to another key', event: wrapOf(sealOf(a.sk, other, r), other, agent.pubkey), wouldName: r.id });
  }
  // A wrap content that is not NIP-44 at all.
  {
    const ev = finalizeEvent({ kind: 1059, created_at: Math.floor(Date.now() / 1000), tags: [['p', agent.pubkey]], content: `AAAA${secret()}` }, generateSecretKey());
    out.push({ name: 'wrap with non-NIP-44 content', event: ev as NostrEvent });
  }
  // NIP-04: bad IV, bad padding, broken payloads.
  const n4 = senders.find((s) => s.channel === 'nip04')!;
  const body = () => JSON.stringify({ type: 'status', workload_id: 'w-000000000000', t: secret() });
  const good = nip04.encrypt(n4.sk, agent.pubkey, body());
  const [ct, iv] = good.split('?iv=') as [string, string];
  const nip04Cases: Array<[string, string]> = [
    ['nip04 short IV', `${ct}?iv=${randomBytes(8).toString('base64')}`],
    ['nip04 long IV', `${ct}?iv=${randomBytes(24).toString('base64')}`],
    ['nip04 empty IV', `${ct}?iv=`],
    ['nip04 no IV', ct],
    ['nip04 IV not base64', `${ct}?iv=!!!!${secret()}`],
    ['nip04 ciphertext not base64', `%%%${secret()}?iv=${iv}`],
    ['nip04 ciphertext not block aligned', `${Buffer.concat([Buffer.from(ct, 'base64'), Buffer.from([1, 2, 3])]).toString('base64')}?iv=${iv}`],
    ['nip04 empty', ''],
    ['nip04 padding byte 0', nip04BadPadding(n4.sk, body(), 0)],
    ['nip04 padding byte 17', nip04BadPadding(n4.sk, body(), 17)],
    ['nip04 padding byte 255', nip04BadPadding(n4.sk, body(), 255)],
  ];
  for (const [name, payload] of nip04Cases) {
    const ev = nip04Raw(n4.sk, payload);
    out.push({ name, event: ev, wouldName: ev.id });
  }
  // NIP-04 event claiming our client as author, signed by someone else (forged sender).
  {
    const ev = nip04Raw(generateSecretKey(), nip04.encrypt(b.sk, agent.pubkey, body()));
    out.push({ name: 'nip04 forged author', event: { ...ev, pubkey: b.pubkey }, wouldName: ev.id });
  }
  // Outer wrap signature broken.
  {
    const rumor = rumorOf(a.pubkey, statusBody());
    const w = wrapOf(sealOf(a.sk, agent.pubkey, rumor), agent.pubkey);
    out.push({ name: 'wrap with bad signature', event: { ...w, sig: '0'.repeat(128) }, wouldName: rumor.id });
  }
  return out;
}

// --- transport -------------------------------------------------------------------

/** Publish events on one raw connection, as a hostile client would; returns the relay's OK verdicts. */
async function rawPublish(events: NostrEvent[]): Promise<Map<string, boolean>> {
  const ws = new WebSocket(relay.url);
  await new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve());
    ws.once('error', reject);
  });
  const verdicts = new Map<string, boolean>();
  const done = new Promise<void>((resolve) => {
    ws.on('message', (data) => {
      const msg = JSON.parse(String(data)) as unknown[];
      if (msg[0] === 'OK') verdicts.set(msg[1] as string, msg[2] as boolean);
      if (verdicts.size === events.length) resolve();
    });
  });
  for (const ev of events) ws.send(JSON.stringify(['EVENT', ev]));
  await Promise.race([done, new Promise((r) => setTimeout(r, 15_000))]);
  ws.close();
  return verdicts;
}

async function inBatches<T>(items: T[], size: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: size }, async () => {
      while (next < items.length) await fn(items[next++]!);
    }),
  );
}

beforeAll(async () => {
  const guest = await ensureTinyGuest();
  relay = await startRelay();
  agent = await startAgentProcess({
    relays: [relay.url],
    guest,
    portRange: PORTS,
    // The corpus is about parsing and authentication, not about the rate limit
    // (limits.test.ts covers that): a bucket no corpus can empty.
    overrides: { limits: { maxContentBytes: MAX_CONTENT, ratePerMinute: 1_000_000, rateBurst: 1_000_000, maxConcurrentRequests: 8 } },
  });
  for (const channel of ['nip17', 'nip04'] as const) {
    for (let i = 0; i < SENDERS_PER_CHANNEL; i++) {
      const sk = generateSecretKey();
      const client = new ConsumerClient({ sk, provider: agent.pubkey, relays: [relay.url], channel });
      await client.start();
      client.onReply((r) => {
        if (typeof r.request_id !== 'string') return void unnamedReplies++;
        const list = replies.get(r.request_id) ?? [];
        list.push(r);
        replies.set(r.request_id, list);
      });
      senders.push({ sk, pubkey: getPublicKey(sk), channel, client });
    }
  }
});

afterAll(async () => {
  await Promise.all(senders.map((s) => s.client.close()));
  await agent?.stop();
  await relay?.stop();
});

describe('hostile corpus', () => {
  it('answers every answerable DM once with the right code, ignores the rest, creates nothing and leaks nothing', async () => {
    const corpus = [...handPicked(), ...generated()];
    const raw = unanswerable();
    expect(corpus.length + raw.length).toBeGreaterThanOrEqual(250);

    // Assign senders round-robin per channel; items that name a channel use it.
    const byChannel = { nip17: senders.filter((s) => s.channel === 'nip17'), nip04: senders.filter((s) => s.channel === 'nip04') };
    const sent: Array<{ item: Answerable; requestId: string; event: NostrEvent; sender: Sender }> = [];
    corpus.forEach((item, i) => {
      const channel = item.channel ?? (i % 3 === 0 ? 'nip04' : 'nip17');
      // NIP-44 cannot carry more than 64 KiB: such content can only travel as NIP-04.
      const ch: Channel = Buffer.byteLength(item.content) > 60_000 ? 'nip04' : channel;
      const sender = byChannel[ch][i % SENDERS_PER_CHANNEL]!;
      // NIP-44 refuses empty plaintext: the empty item goes as NIP-04.
      const useCh: Channel = item.content.length === 0 ? 'nip04' : ch;
      const s = useCh === ch ? sender : byChannel.nip04[0]!;
      const { event, requestId } = sealDmRequest({ sk: s.sk, recipient: agent.pubkey, content: item.content, channel: useCh });
      sent.push({ item, requestId, event, sender: s });
    });

    const started = Date.now();
    await inBatches(sent, 16, async ({ event, sender }) => sender.client.publishEvent(event));
    const verdicts = await rawPublish(raw.map((r) => r.event));

    const answerable = new Map(sent.map((s) => [s.requestId, s]));
    await until(() => [...answerable.keys()].every((id) => replies.has(id)), 90_000, 'a reply to every answerable request');
    const answeredMs = Date.now() - started;

    // Replays after the fact: the same events again, and the same rumor in a fresh wrap.
    const replayed = sent.slice(0, 20).map((s) => s.event);
    await rawPublish(replayed);
    // A trailing space keeps each item's meaning but makes a new rumor id.
    const rewrapped = sent
      .filter((s) => s.event.kind === 1059 && s.item.content.length < 1000)
      .slice(0, 5)
      .map((s) => {
        const rumor = rumorOf(s.sender.pubkey, `${s.item.content} `);
        return { rumor, sender: s.sender, expect: s.item.expect, event: wrapOf(sealOf(s.sender.sk, agent.pubkey, rumor), agent.pubkey) };
      });
    // First the fresh rumors once (they are answered), then each again in a new wrap (must not be).
    await rawPublish(rewrapped.map((r) => r.event));
    await until(() => rewrapped.every((r) => replies.has(r.rumor.id)), 30_000, 'replies to the re-wrapped rumors');
    await rawPublish(rewrapped.map((r) => wrapOf(sealOf(r.sender.sk, agent.pubkey, r.rumor), agent.pubkey)));
    // A quiet period for anything that should not come.
    await new Promise((r) => setTimeout(r, 3000));

    // 1. Alive.
    expect(agent.proc.exitCode).toBeNull();
    // 2. Exactly one reply per answerable request, with the expected code.
    const wrong: string[] = [];
    for (const [id, s] of answerable) {
      const got = replies.get(id) ?? [];
      if (got.length !== 1 || got[0]!.type !== 'error' || got[0]!.code !== s.item.expect) {
        wrong.push(`${s.item.name}: expected one ${s.item.expect}, got ${JSON.stringify(got.map((r) => r.code ?? r.type))} for ${JSON.stringify(s.item.content.slice(0, 120))}`);
      }
    }
    expect(wrong).toEqual([]);
    for (const r of rewrapped) {
      expect(replies.get(r.rumor.id)).toHaveLength(1);
      expect(replies.get(r.rumor.id)?.[0]?.code).toBe(r.expect);
    }
    // 3. Nothing for the unanswerable ones, nor for anything we did not send.
    const known = new Set([...answerable.keys(), ...rewrapped.map((r) => r.rumor.id)]);
    for (const u of raw) if (u.wouldName) expect(replies.has(u.wouldName), u.name).toBe(false);
    expect([...replies.keys()].filter((id) => !known.has(id))).toEqual([]);
    expect(unnamedReplies).toBe(0);
    // ... and they did reach the agent (not merely refused by the relay): each one it got is logged as ignored, with why.
    const ignoredLines = agent.output().split('\n').filter((l) => l.includes('event ignored'));
    const delivered = raw.filter((u) => verdicts.get(u.event.id) === true);
    expect(delivered.length).toBeGreaterThanOrEqual(raw.length - 3);
    for (const u of delivered) expect(ignoredLines.some((l) => l.includes(u.event.id)), u.name).toBe(true);
    // 4. Nothing created on the host.
    expect(existsSync(agent.vmRoot) ? readdirSync(agent.vmRoot) : []).toEqual([]);
    expect(qemuPidsMatching(agent.root)).toEqual([]);
    for (let p = PORTS.from; p <= PORTS.to; p++) expect(await isFree(p)).toBe(true);
    expect(readdirSync(join(agent.stateDir, 'leases'))).toEqual([]);
    expect(readdirSync(join(agent.stateDir, 'inflight'))).toEqual([]);
    // 5. No planted secret in the agent's output, its state files, or any reply.
    const output = agent.output();
    const inFiles = filesUnder(agent.root)
      .filter((f) => !f.endsWith('provider.json'))
      .map((f) => readFileSync(f, 'latin1'))
      .join('\n');
    const replyText = JSON.stringify([...replies.values()]);
    const leaked = [...secrets].filter((s) => output.includes(s) || inFiles.includes(s) || replyText.includes(s));
    expect(leaked).toEqual([]);
    expect(secrets.size).toBeGreaterThan(200);

    const relayRejected = [...verdicts.values()].filter((ok) => !ok).length;
    console.log(
      `hostile corpus: ${corpus.length} answerable + ${raw.length} unanswerable + ${replayed.length + 2 * rewrapped.length} replays; ` +
        `all answered in ${answeredMs} ms; relay refused ${relayRejected} of the raw events; agent log ${output.length} bytes`,
    );
  });
});
