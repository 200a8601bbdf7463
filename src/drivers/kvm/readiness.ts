/**
 * Is the guest ready for the consumer? Two signals, read without credentials:
 *  - the forwarded port answers with an `SSH-2.0-` banner (qemu listens on the
 *    host port before the guest does, so a TCP connect alone proves nothing);
 *  - for cloud-init guests, cloud-init's final message carrying this VM's
 *    token appears on the serial console — the banner comes ~10 s before the
 *    root password is set.
 */
import { connect } from 'node:net';

/** Read the first bytes a TCP server sends; true if they start an SSH banner. */
export function probeSshBanner(host: string, port: number, timeoutMs = 3000): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = connect({ host, port });
    let buf = '';
    const done = (ok: boolean) => {
      clearTimeout(timer);
      sock.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    sock.setEncoding('latin1');
    sock.on('data', (chunk: string) => {
      buf += chunk;
      if (buf.length >= 8 || buf.includes('\n')) done(buf.startsWith('SSH-2.0-'));
    });
    sock.on('error', () => done(false));
    sock.on('end', () => done(false));
  });
}

/** The host address to probe a forward bound to `bindAddress` on. */
export function probeHost(bindAddress: string): string {
  if (bindAddress === '0.0.0.0' || bindAddress === '') return '127.0.0.1';
  if (bindAddress === '::') return '::1';
  return bindAddress;
}

/**
 * The last lines of a serial log as plain text: ANSI escapes and other control
 * characters removed, at most `maxLines` lines and `maxChars` characters.
 */
export function consoleTail(text: string, maxLines = 25, maxChars = 3000): string {
  const clean = text
    .replace(/\x1b\[[0-9;?]*[ -/]*[@-~]/g, '')
    .replace(/\r/g, '')
    .replace(/[\x00-\x08\x0b-\x1f\x7f]/g, '');
  const lines = clean.split('\n').filter((l) => l.trim() !== '');
  const tail = lines.slice(-maxLines).join('\n');
  return tail.length > maxChars ? tail.slice(-maxChars) : tail;
}
