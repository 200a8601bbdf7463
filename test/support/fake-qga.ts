/**
 * A stand-in for a compromised or wedged guest agent: a unix socket server
 * speaking qemu-ga's real wire protocol (0xFF parser reset, delimited
 * guest-sync-delimited answer, one JSON answer line per command) that can be
 * told to lie or hang at one point. Tests put it where a VM's qga.sock was,
 * which is exactly what a hostile guest controls: every byte that comes out
 * of that socket.
 */
import { createServer, type Server, type Socket } from 'node:net';
import { rmSync } from 'node:fs';

export type FakeQgaBehaviour =
  /** Answers like qemu-ga 7.2 would, with the sshd drop-in the seed writes. */
  | 'honest'
  /** The delimited sync answer carries another id. */
  | 'wrong-sync-id'
  /** After a correct sync, a line that is not JSON. */
  | 'malformed'
  /** After a correct sync, an error answer (with terminal escapes and far too long). */
  | 'error-answer'
  /** After a correct sync, an endless answer without a newline. */
  | 'oversized'
  /** Accepts the connection and never answers. */
  | 'hang'
  /** Answers everything, but the sshd drop-in it reports is not the one that opens root login. */
  | 'wrong-dropin'
  /** Answers everything, but nothing listens on port 22 in its /proc/net/tcp. */
  | 'sshd-down';

export interface FakeQga {
  /** Commands received, by name, in order. */
  readonly received: string[];
  /** What was written to each path, last write wins. */
  readonly written: Map<string, Buffer>;
  close(): Promise<void>;
}

/** Files the fake serves to guest-file-read, by path. */
export type FakeFiles = Record<string, string>;

export async function startFakeQga(path: string, behaviour: FakeQgaBehaviour, files: FakeFiles): Promise<FakeQga> {
  const received: string[] = [];
  const written = new Map<string, Buffer>();
  const sockets = new Set<Socket>();
  const server: Server = createServer((sock) => {
    sockets.add(sock);
    sock.on('close', () => sockets.delete(sock));
    sock.on('error', () => undefined);
    let buf = Buffer.alloc(0);
    const handles = new Map<number, string>();
    let nextHandle = 1000;
    sock.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      for (;;) {
        // 0xFF resets the parser: drop it (and whatever came before).
        const ff = buf.lastIndexOf(0xff);
        if (ff >= 0) buf = buf.subarray(ff + 1);
        const nl = buf.indexOf(0x0a);
        if (nl < 0) return;
        const line = buf.subarray(0, nl).toString('utf8');
        buf = buf.subarray(nl + 1);
        let cmd: { execute: string; arguments?: Record<string, unknown> };
        try {
          cmd = JSON.parse(line);
        } catch {
          continue;
        }
        received.push(cmd.execute);
        if (behaviour === 'hang') continue;
        const send = (obj: unknown) => sock.write(`${JSON.stringify(obj)}\n`);
        if (cmd.execute !== 'guest-sync-delimited' && received.length === 2) {
          // The first command after the sync: where these behaviours strike.
          if (behaviour === 'malformed') {
            sock.write('{"return": {}, oops\n');
            continue;
          }
          if (behaviour === 'error-answer') {
            send({ error: { class: 'GenericError', desc: `open failed \x1b[31m${'x'.repeat(500)}` } });
            continue;
          }
          if (behaviour === 'oversized') {
            sock.write(Buffer.alloc(1024 * 1024, 0x41));
            continue;
          }
        }
        switch (cmd.execute) {
          case 'guest-sync-delimited': {
            const id = cmd.arguments!.id as number;
            sock.write(Buffer.from([0xff]));
            send({ return: behaviour === 'wrong-sync-id' ? id + 1 : id });
            break;
          }
          case 'guest-file-open': {
            const h = nextHandle++;
            handles.set(h, String(cmd.arguments!.path));
            send({ return: h });
            break;
          }
          case 'guest-file-write': {
            const b64 = String(cmd.arguments!['buf-b64']);
            written.set(handles.get(cmd.arguments!.handle as number)!, Buffer.from(b64, 'base64'));
            send({ return: { count: Buffer.from(b64, 'base64').length, eof: false } });
            break;
          }
          case 'guest-file-read': {
            const file = handles.get(cmd.arguments!.handle as number)!;
            let text = files[file] ?? '';
            if (behaviour === 'wrong-dropin' && file.startsWith('/etc/ssh/')) text = 'PermitRootLogin no\n';
            if (behaviour === 'sshd-down' && file === '/proc/net/tcp') text = text.replace(' 0A ', ' 01 ');
            const content = Buffer.from(text);
            send({ return: { count: content.length, 'buf-b64': content.toString('base64'), eof: true } });
            break;
          }
          default:
            send({ return: {} });
        }
      }
    });
  });
  rmSync(path, { force: true });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => resolve());
  });
  return {
    received,
    written,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
