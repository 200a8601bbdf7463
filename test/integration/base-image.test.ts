/**
 * ensureBaseImage against real parts: a node:http server on 127.0.0.1 serving
 * images made by the real qemu-img, the real global fetch, the real qemu-img
 * info checks and the real filesystem.
 */
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, mkdirSync, copyFileSync, utimesSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { execa } from 'execa';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BaseImageError, ensureBaseImage, type BaseImageFormat } from '../../src/drivers/kvm/base-image.js';
import { silentLogger, type Logger } from '../../src/util/logger.js';

const TOKEN = 'S3CRET-T0KEN-in-query';
let root: string;
let server: Server;
let base: string;
/** Requests seen by the server, per pathname. */
const requests = new Map<string, number>();
/** Served files: pathname → bytes. */
const files = new Map<string, Buffer>();
let goodSha: string;
let flakyFailuresLeft = 1;

function sha256(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

function count(pathname: string): number {
  return requests.get(pathname) ?? 0;
}

function totalRequests(): number {
  return [...requests.values()].reduce((a, b) => a + b, 0);
}

let caseNo = 0;
/** A fresh, not-yet-existing image path in a not-yet-existing directory. */
function target(name = 'base.qcow2'): { dir: string; file: string } {
  const dir = join(root, `case-${++caseNo}`, 'images');
  return { dir, file: join(dir, name) };
}

function leftovers(dir: string): string[] {
  return existsSync(dir) ? readdirSync(dir) : [];
}

async function rejection(p: Promise<unknown>): Promise<BaseImageError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(BaseImageError);
  return err as BaseImageError;
}

function opts(file: string, over: { url?: string; sha256?: string; format?: BaseImageFormat; logger?: Logger; progressEveryMs?: number } = {}) {
  return { path: file, format: 'qcow2' as BaseImageFormat, qemuImgBinary: 'qemu-img', logger: silentLogger, ...over };
}

function capturingLogger(): { logger: Logger; lines: string[] } {
  const lines: string[] = [];
  const logger = pino({ level: 'info' }, { write: (s: string) => void lines.push(s) });
  return { logger, lines };
}

beforeAll(async () => {
  root = mkdtempSync(join(tmpdir(), 'paygress-base-image-'));
  const src = join(root, 'src');
  mkdirSync(src);
  const good = join(src, 'good.qcow2');
  await execa('qemu-img', ['create', '-q', '-f', 'qcow2', good, '64M']);
  await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', good, '-F', 'qcow2', join(src, 'backed.qcow2')]);
  await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `data_file=${join(src, 'data.raw')}`, join(src, 'datafile.qcow2'), '64M']);
  await execa('qemu-img', ['create', '-q', '-f', 'raw', join(src, 'disk.raw'), '1M']);
  files.set('/good.qcow2', readFileSync(good));
  files.set('/backed.qcow2', readFileSync(join(src, 'backed.qcow2')));
  files.set('/datafile.qcow2', readFileSync(join(src, 'datafile.qcow2')));
  files.set('/disk.raw', readFileSync(join(src, 'disk.raw')));
  goodSha = sha256(files.get('/good.qcow2')!);

  server = createServer((req, res) => {
    const { pathname } = new URL(req.url ?? '/', 'http://x');
    requests.set(pathname, count(pathname) + 1);
    const good = files.get('/good.qcow2')!;
    if (pathname === '/truncated.qcow2') {
      // Promise the whole file, send a third of it, then drop the connection.
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(good.length) });
      res.write(good.subarray(0, Math.floor(good.length / 3)), () => setTimeout(() => res.socket?.destroy(), 20));
      return;
    }
    if (pathname === '/chunked.qcow2') {
      // No Content-Length: progress without a percentage.
      res.writeHead(200, { 'content-type': 'application/octet-stream' });
      res.write(good.subarray(0, 50_000));
      res.end(good.subarray(50_000));
      return;
    }
    if (pathname === '/flaky.qcow2' && flakyFailuresLeft > 0) {
      flakyFailuresLeft--;
      res.writeHead(503).end('try later');
      return;
    }
    const body = pathname === '/flaky.qcow2' ? good : files.get(pathname);
    if (!body) {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found');
      return;
    }
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(body.length) });
    res.end(body);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

afterAll(async () => {
  server?.closeAllConnections();
  await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
  if (root) rmSync(root, { recursive: true, force: true });
});

describe('download', () => {
  it('downloads a pinned image: in place, read-only, described, no .part left', async () => {
    const { dir, file } = target();
    const before = count('/good.qcow2');
    const info = await ensureBaseImage(opts(file, { url: `${base}/good.qcow2`, sha256: goodSha.toUpperCase() }));
    expect(info).toEqual({ path: file, format: 'qcow2', virtualSize: 64 * 1024 * 1024, actualSize: expect.any(Number), downloaded: true });
    expect(info.actualSize).toBeGreaterThan(0);
    expect(count('/good.qcow2')).toBe(before + 1);
    expect(sha256(readFileSync(file))).toBe(goodSha);
    expect(statSync(file).mode & 0o777).toBe(0o444);
    expect(statSync(dir).mode & 0o777).toBe(0o750);
    expect(leftovers(dir)).toEqual(['base.qcow2']);
  });

  it('logs progress and a final line with origin + path only, never the query string', async () => {
    const { dir, file } = target();
    const { logger, lines } = capturingLogger();
    await ensureBaseImage(opts(file, { url: `${base}/good.qcow2?token=${TOKEN}`, sha256: goodSha, logger, progressEveryMs: 0 }));
    const log = lines.join('');
    expect(log).not.toContain(TOKEN);
    expect(log).not.toContain('token=');
    const entries = lines.map((l) => JSON.parse(l) as Record<string, unknown>);
    const progress = entries.filter((e) => String(e.msg).startsWith('downloading base image'));
    expect(progress.length).toBeGreaterThan(0);
    expect(progress.at(-1)).toMatchObject({ url: `${base}/good.qcow2`, bytes: files.get('/good.qcow2')!.length, percent: 100 });
    expect(progress.every((e) => typeof e.bytesPerSecond === 'number' || e.bytesPerSecond === undefined)).toBe(true);
    const final = entries.find((e) => String(e.msg).startsWith('downloaded base image'));
    expect(final).toMatchObject({ bytes: files.get('/good.qcow2')!.length, durationMs: expect.any(Number), sha256: goodSha });
    expect(leftovers(dir)).toEqual(['base.qcow2']);
  });

  it('downloads without Content-Length (progress has no percentage)', async () => {
    const { file } = target();
    const { logger, lines } = capturingLogger();
    const info = await ensureBaseImage(opts(file, { url: `${base}/chunked.qcow2`, sha256: goodSha, logger, progressEveryMs: 0 }));
    expect(info.downloaded).toBe(true);
    const progress = lines.map((l) => JSON.parse(l) as Record<string, unknown>).filter((e) => String(e.msg).startsWith('downloading base image'));
    expect(progress.length).toBeGreaterThan(0);
    expect(progress.every((e) => e.percent === undefined && e.totalBytes === undefined)).toBe(true);
  });

  it('a wrong sha256 names both hashes and keeps nothing', async () => {
    const { dir, file } = target();
    const wrong = 'ab'.repeat(32);
    const err = await rejection(ensureBaseImage(opts(file, { url: `${base}/good.qcow2`, sha256: wrong })));
    expect(err.problem).toBe('checksum');
    expect(err.message).toContain(wrong);
    expect(err.message).toContain(goodSha);
    expect(existsSync(file)).toBe(false);
    expect(leftovers(dir)).toEqual([]);
  });

  it('a stream cut short of its Content-Length fails and keeps nothing', async () => {
    const { dir, file } = target();
    const before = count('/truncated.qcow2');
    const err = await rejection(ensureBaseImage(opts(file, { url: `${base}/truncated.qcow2`, sha256: goodSha })));
    expect(count('/truncated.qcow2')).toBe(before + 1);
    expect(err.problem).toBe('download');
    expect(err.message).toContain(`${base}/truncated.qcow2`);
    expect(existsSync(file)).toBe(false);
    expect(leftovers(dir)).toEqual([]);
  });

  it('a 404 fails with the status, keeps nothing and does not echo the query string', async () => {
    const { dir, file } = target();
    const err = await rejection(ensureBaseImage(opts(file, { url: `${base}/nope.qcow2?token=${TOKEN}`, sha256: goodSha })));
    expect(err.problem).toBe('download');
    expect(err.message).toContain('404');
    expect(err.message).not.toContain(TOKEN);
    expect(existsSync(file)).toBe(false);
    expect(leftovers(dir)).toEqual([]);
  });

  it('a connection refused fails cleanly', async () => {
    const { dir, file } = target();
    // A port that was free a moment ago: nothing listens there now.
    const probe = createServer();
    await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
    const port = (probe.address() as AddressInfo).port;
    await new Promise<void>((resolve) => probe.close(() => resolve()));
    const err = await rejection(ensureBaseImage(opts(file, { url: `http://127.0.0.1:${port}/x.qcow2`, sha256: goodSha })));
    expect(err.problem).toBe('download');
    expect(err.message).toMatch(/ECONNREFUSED/);
    expect(leftovers(dir)).toEqual([]);
  });

  it('a failure is not cached: the next call tries again', async () => {
    const { file } = target();
    flakyFailuresLeft = 1;
    const before = count('/flaky.qcow2');
    const err = await rejection(ensureBaseImage(opts(file, { url: `${base}/flaky.qcow2`, sha256: goodSha })));
    expect(err.message).toContain('503');
    const info = await ensureBaseImage(opts(file, { url: `${base}/flaky.qcow2`, sha256: goodSha }));
    expect(info.downloaded).toBe(true);
    expect(count('/flaky.qcow2')).toBe(before + 2);
  });

  it('refuses a downloaded image with a backing file, keeping nothing', async () => {
    const { dir, file } = target();
    const body = files.get('/backed.qcow2')!;
    const err = await rejection(ensureBaseImage(opts(file, { url: `${base}/backed.qcow2`, sha256: sha256(body) })));
    expect(err.problem).toBe('backing');
    expect(err.message).toMatch(/backing file/);
    expect(err.message).toMatch(/qemu-img convert/);
    expect(existsSync(file)).toBe(false);
    expect(leftovers(dir)).toEqual([]);
  });

  it('refuses a downloaded image with an external data file', async () => {
    const { dir, file } = target();
    const err = await rejection(ensureBaseImage(opts(file, { url: `${base}/datafile.qcow2`, sha256: sha256(files.get('/datafile.qcow2')!) })));
    expect(err.problem).toBe('backing');
    expect(err.message).toMatch(/external file/);
    expect(leftovers(dir)).toEqual([]);
  });

  it('refuses a downloaded image of the wrong format', async () => {
    const { dir, file } = target();
    const err = await rejection(ensureBaseImage(opts(file, { url: `${base}/disk.raw`, sha256: sha256(files.get('/disk.raw')!) })));
    expect(err.problem).toBe('format');
    expect(err.message).toContain('drivers.kvm.baseImageFormat');
    expect(leftovers(dir)).toEqual([]);
  });

  it('two concurrent calls for one path make one download', async () => {
    const { dir, file } = target();
    const before = count('/good.qcow2');
    const [a, b] = await Promise.all([
      ensureBaseImage(opts(file, { url: `${base}/good.qcow2`, sha256: goodSha })),
      ensureBaseImage(opts(file, { url: `${base}/good.qcow2`, sha256: goodSha })),
    ]);
    expect(count('/good.qcow2')).toBe(before + 1);
    expect(a).toEqual(b);
    expect(a.downloaded).toBe(true);
    expect(leftovers(dir)).toEqual(['base.qcow2']);
    // Once settled, a later call checks the file in place and fetches nothing.
    const c = await ensureBaseImage(opts(file, { url: `${base}/good.qcow2`, sha256: goodSha }));
    expect(c.downloaded).toBe(false);
    expect(count('/good.qcow2')).toBe(before + 1);
  });
});

describe('config checks before any request', () => {
  it('refuses an http URL without sha256, without a request or a directory', async () => {
    const { dir, file } = target();
    const before = totalRequests();
    const err = await rejection(ensureBaseImage(opts(file, { url: `${base}/good.qcow2?token=${TOKEN}` })));
    expect(err.problem).toBe('insecure-url');
    expect(err.message).toContain('drivers.kvm.baseImageSha256');
    expect(err.message).not.toContain(TOKEN);
    expect(totalRequests()).toBe(before);
    expect(existsSync(dir)).toBe(false);
  });

  it('refuses a malformed sha256 and non-http(s) schemes', async () => {
    const { file } = target();
    const before = totalRequests();
    expect((await rejection(ensureBaseImage(opts(file, { url: `${base}/good.qcow2`, sha256: 'abc' })))).problem).toBe('bad-config');
    expect((await rejection(ensureBaseImage(opts(file, { url: 'file:///etc/passwd', sha256: goodSha })))).problem).toBe('bad-config');
    expect(totalRequests()).toBe(before);
  });

  it('names the config fields when the image is missing and no URL is set', async () => {
    const { file } = target();
    const err = await rejection(ensureBaseImage(opts(file)));
    expect(err.problem).toBe('missing');
    expect(err.message).toContain(file);
    for (const field of ['drivers.kvm.baseImage', 'drivers.kvm.baseImageUrl', 'drivers.kvm.baseImageSha256']) {
      expect(err.message).toContain(field);
    }
  });
});

describe('existing image', () => {
  function place(srcPath: string): string {
    const { dir, file } = target();
    mkdirSync(dir, { recursive: true });
    copyFileSync(srcPath, file);
    return file;
  }

  it('a good image is checked and returned without any request', async () => {
    const file = place(join(root, 'src', 'good.qcow2'));
    const before = totalRequests();
    const info = await ensureBaseImage(opts(file, { url: `${base}/good.qcow2`, sha256: goodSha }));
    expect(info).toMatchObject({ path: file, format: 'qcow2', virtualSize: 64 * 1024 * 1024, downloaded: false });
    expect(totalRequests()).toBe(before);
  });

  it('removes partial downloads an earlier run left, keeping fresh ones and anything else', async () => {
    const file = place(join(root, 'src', 'good.qcow2'));
    const dir = dirname(file);
    const stale = join(dir, '.base.qcow2.0123456789ab.part');
    const fresh = join(dir, '.base.qcow2.ba9876543210.part');
    const foreign = join(dir, '.other.qcow2.0123456789ab.part');
    const odd = join(dir, '.base.qcow2.not-hex.part');
    for (const f of [stale, fresh, foreign, odd]) writeFileSync(f, 'partial bytes');
    const old = new Date(Date.now() - 10 * 60_000);
    for (const f of [stale, foreign, odd]) utimesSync(f, old, old);
    await ensureBaseImage(opts(file));
    expect(existsSync(stale)).toBe(false);
    for (const f of [fresh, foreign, odd, file]) expect(existsSync(f), f).toBe(true);
  });

  it('a raw image where qcow2 is configured is refused, and the reverse', async () => {
    const raw = place(join(root, 'src', 'disk.raw'));
    const err = await rejection(ensureBaseImage(opts(raw, { format: 'qcow2' })));
    expect(err.problem).toBe('format');
    expect(err.message).toMatch(/is raw/);
    expect(err.message).toContain('drivers.kvm.baseImageFormat');
    const qcow = place(join(root, 'src', 'good.qcow2'));
    expect((await rejection(ensureBaseImage(opts(qcow, { format: 'raw' })))).problem).toBe('format');
    // ...and the matching format passes.
    expect((await ensureBaseImage(opts(raw, { format: 'raw' }))).virtualSize).toBe(1024 * 1024);
  });

  it('an image with a backing file is refused', async () => {
    const file = place(join(root, 'src', 'backed.qcow2'));
    const err = await rejection(ensureBaseImage(opts(file)));
    expect(err.problem).toBe('backing');
    expect(err.message).toContain(join(root, 'src', 'good.qcow2'));
  });

  it('something that is not a disk image is refused', async () => {
    const { dir, file } = target();
    mkdirSync(file, { recursive: true });
    expect((await rejection(ensureBaseImage(opts(file)))).problem).toBe('invalid');
    expect(existsSync(dir)).toBe(true);
  });
});
