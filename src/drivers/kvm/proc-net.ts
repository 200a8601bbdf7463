/**
 * Pure reading of a guest's /proc/net/tcp (or tcp6): is anything
 * listening on a TCP port? The hand-off's proof that sshd's listener is up at
 * that moment, read through the guest agent (a host-side banner probe is
 * slow: sshd forks and re-executes itself per connection; docs/guest-images.md).
 * Total: malformed lines are skipped, never a throw.
 */

/** The kernel's TCP_LISTEN state, as /proc/net/tcp prints it. */
const LISTEN = '0A';

/** True when a line of the table is a socket in LISTEN state on `port` (any local address). */
export function listensOnPort(table: string, port: number): boolean {
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new RangeError('port out of range');
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0');
  for (const line of table.split('\n').slice(1)) {
    // "  0: 00000000:0016 00000000:0000 0A ..."
    const fields = line.trim().split(/\s+/);
    if (fields.length < 4) continue;
    const local = fields[1]!;
    const colon = local.lastIndexOf(':');
    if (colon < 0 || !/^[0-9A-F]+$/.test(local.slice(0, colon))) continue;
    if (local.slice(colon + 1) === hexPort && fields[3] === LISTEN) return true;
  }
  return false;
}
