/**
 * Validation of OpenSSH public keys ("authorized_keys" lines). A key ends up in
 * the guest's cloud-config, so only well-formed single-line keys pass: the type
 * word, base64 that decodes to a blob whose embedded type matches, an optional
 * printable comment.
 */
/** Key type → number of length-prefixed fields in its wire blob (RFC 4253 §6.6, RFC 5656, PROTOCOL.u2f). */
const KEY_FIELDS = new Map<string, number>([
  ['ssh-ed25519', 2],
  ['ssh-rsa', 3],
  ['ecdsa-sha2-nistp256', 3],
  ['ecdsa-sha2-nistp384', 3],
  ['ecdsa-sha2-nistp521', 3],
  ['sk-ssh-ed25519@openssh.com', 3],
  ['sk-ecdsa-sha2-nistp256@openssh.com', 4],
]);

const LINE = /^([a-z0-9@.-]+) ([A-Za-z0-9+/]+={0,2})(?: ([\x20-\x7e]{1,200}))?$/;

export function isValidSshPublicKey(line: string): boolean {
  if (line.length > 16_384) return false;
  const m = LINE.exec(line);
  if (!m) return false;
  const [, type, b64] = m as unknown as [string, string, string];
  const fieldCount = KEY_FIELDS.get(type);
  if (fieldCount === undefined) return false;
  const blob = Buffer.from(b64, 'base64');
  // Re-encoding must give the same text, or the base64 was not canonical.
  if (blob.toString('base64') !== b64) return false;
  const fields = splitFields(blob);
  if (!fields || fields.length !== fieldCount || fields[0]?.toString('latin1') !== type) return false;
  return type !== 'ssh-ed25519' || fields[1]?.length === 32;
}

/** The blob as length-prefixed strings; null unless they consume it exactly. */
function splitFields(blob: Buffer): Buffer[] | null {
  const fields: Buffer[] = [];
  let at = 0;
  while (at < blob.length) {
    if (at + 4 > blob.length) return null;
    const len = blob.readUInt32BE(at);
    if (len === 0 || at + 4 + len > blob.length) return null;
    fields.push(blob.subarray(at + 4, at + 4 + len));
    at += 4 + len;
  }
  return fields;
}
