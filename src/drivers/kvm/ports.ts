/**
 * In-process SSH port allocator. A port is reserved synchronously (before any
 * await), so concurrent creates in this process can never get the same port;
 * it is then checked to be bindable on the bind address, which also skips
 * ports held by qemus that outlived an agent restart or by anything else.
 */
import net from 'node:net';

export class PortAllocator {
  private readonly reserved = new Set<number>();
  private cursor: number;

  constructor(
    private readonly bindAddress: string,
    private readonly from: number,
    private readonly to: number,
  ) {
    if (!Number.isInteger(from) || !Number.isInteger(to) || from < 1 || to > 65535 || from > to) {
      throw new RangeError(`bad port range ${from}-${to}`);
    }
    this.cursor = from;
  }

  get size(): number {
    return this.to - this.from + 1;
  }

  release(port: number): void {
    this.reserved.delete(port);
  }

  /**
   * A reserved, currently bindable port, or undefined when none is left.
   * Scans round-robin from after the last allocation so a just-released port
   * is not handed out again at once. `skip` excludes ports already tried.
   */
  async allocate(skip: ReadonlySet<number> = new Set()): Promise<number | undefined> {
    for (let n = 0; n < this.size; n++) {
      const port = this.cursor;
      this.cursor = port >= this.to ? this.from : port + 1;
      if (this.reserved.has(port) || skip.has(port)) continue;
      this.reserved.add(port);
      if (await canBind(this.bindAddress, port)) return port;
      this.reserved.delete(port);
    }
    return undefined;
  }
}

export function canBind(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', () => resolve(false));
    srv.listen({ host, port, exclusive: true }, () => srv.close(() => resolve(true)));
  });
}
