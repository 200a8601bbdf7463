/**
 * Base-image provisioning: make sure the image every VM overlay is built on
 * exists, is the configured format and stands alone (no backing file, no
 * external data file), downloading it once if it is missing and a URL is set.
 *
 * The final path either does not exist or holds a complete, verified image:
 * the download goes to a temp file in the same directory, is hashed while it
 * streams, checked with `qemu-img info`, fsynced, made read-only and only then
 * renamed into place.
 *
 * Longer than the house's ~350 lines: the download, its verification and
 * the atomic install are one transaction and are read together.
 */
import { createHash, randomBytes } from 'node:crypto';
import { chmod, mkdir, open, readdir, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import type { Logger } from '../../util/logger.js';

export type BaseImageFormat = 'qcow2' | 'raw';

export interface BaseImageInfo {
  /** Absolute path of the image. */
  path: string;
  format: BaseImageFormat;
  /** Size the guest sees, in bytes. */
  virtualSize: number;
  /** Bytes the image takes on the host's disk. */
  actualSize: number;
  /** True when this call (or the concurrent call it joined) downloaded the image. */
  downloaded: boolean;
}

export interface EnsureBaseImageOptions {
  path: string;
  url?: string;
  /** Expected SHA-256 of the downloaded file, hex (either case). */
  sha256?: string;
  format: BaseImageFormat;
  qemuImgBinary: string;
  logger: Logger;
  fetchImpl?: typeof fetch;
  /** Least time between two progress log lines. Default 5000. */
  progressEveryMs?: number;
  /** A download larger than this is aborted (guards the disk against a runaway server). Default 64 GiB. */
  maxBytes?: number;
}

/** Why a base image was refused; the message says what is wrong and how to fix it. */
export type BaseImageProblem =
  | 'missing'
  | 'bad-config'
  | 'insecure-url'
  | 'download'
  | 'checksum'
  | 'format'
  | 'backing'
  | 'invalid'
  | 'io';

export class BaseImageError extends Error {
  constructor(
    readonly problem: BaseImageProblem,
    message: string,
  ) {
    super(message);
    this.name = 'BaseImageError';
  }
}

/** The config fields an operator sets to fix a base-image problem. */
export const BASE_IMAGE_FIELDS = {
  path: 'drivers.kvm.baseImage',
  format: 'drivers.kvm.baseImageFormat',
  url: 'drivers.kvm.baseImageUrl',
  sha256: 'drivers.kvm.baseImageSha256',
  qemuImg: 'drivers.kvm.qemuImgBinary',
} as const;

const DEFAULT_PROGRESS_MS = 5_000;
const DEFAULT_MAX_BYTES = 64 * 1024 ** 3;
/** qemu-img info on a local file takes milliseconds; a minute means something is badly wrong. */
const QEMU_IMG_TIMEOUT_MS = 60_000;
const SHA256_RE = /^[0-9a-fA-F]{64}$/;

// ---------------------------------------------------------------- pure core

/** origin + pathname: the query string (and any userinfo) may carry a token and never reaches a log. */
export function urlForLog(url: URL): string {
  return `${url.origin}${url.pathname}`;
}

/** Lowercase hex, or a bad-config error naming the field (the value itself is harmless to echo). */
export function normalizeSha256(sha256: string): string {
  const s = sha256.trim();
  if (!SHA256_RE.test(s)) {
    throw new BaseImageError('bad-config', `${BASE_IMAGE_FIELDS.sha256} must be 64 hex digits (the output of sha256sum), got ${JSON.stringify(sha256.slice(0, 80))}`);
  }
  return s.toLowerCase();
}

/**
 * Parse and vet the download URL. https is always allowed; http only with a
 * pinned sha256, since nothing else would authenticate what arrives.
 * The raw string is never echoed: it may hold a token.
 */
export function checkDownloadUrl(raw: string, sha256: string | undefined): URL {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new BaseImageError('bad-config', `${BASE_IMAGE_FIELDS.url} is not a valid absolute URL`);
  }
  if (url.protocol === 'https:') return url;
  if (url.protocol === 'http:') {
    if (sha256 === undefined) {
      throw new BaseImageError(
        'insecure-url',
        `${BASE_IMAGE_FIELDS.url} (${urlForLog(url)}) is plain http and ${BASE_IMAGE_FIELDS.sha256} is not set: ` +
          `an unauthenticated download must be pinned. Set ${BASE_IMAGE_FIELDS.sha256} to the image's SHA-256, or use an https URL`,
      );
    }
    return url;
  }
  throw new BaseImageError('bad-config', `${BASE_IMAGE_FIELDS.url} must be an https:// (or pinned http://) URL, got a ${url.protocol} URL`);
}

export interface ImageFacts {
  format: BaseImageFormat;
  virtualSize: number;
  actualSize: number;
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * Judge `qemu-img info --output=json` output. `what` names the image in
 * messages (a path, or "the image downloaded from <url>").
 *
 * A backing file or an external data file would make every VM read (and, for
 * a data file, the guest possibly write) some other host file named inside the
 * image; an image fetched from the network gets no say in that.
 */
export function checkImageInfo(info: unknown, expected: BaseImageFormat, what: string): ImageFacts {
  if (!isRecord(info) || typeof info.format !== 'string' || typeof info['virtual-size'] !== 'number') {
    throw new BaseImageError('invalid', `${what}: qemu-img info gave output without a format or virtual size; is it a disk image?`);
  }
  const format = info.format;
  if (format !== expected) {
    const hint =
      format === 'qcow2' || format === 'raw'
        ? `set ${BASE_IMAGE_FIELDS.format}: ${format}, or convert it with \`qemu-img convert -O ${expected} <in> <out>\``
        : `convert it with \`qemu-img convert -O ${expected} <in> <out>\``;
    throw new BaseImageError('format', `${what} is ${format}, but ${BASE_IMAGE_FIELDS.format} is ${expected}: ${hint}`);
  }
  const backing = info['backing-filename'] ?? info['full-backing-filename'];
  if (backing !== undefined) {
    throw new BaseImageError(
      'backing',
      `${what} has a backing file (${String(backing)}); a base image must stand alone. ` +
        `Flatten it with \`qemu-img convert -O ${expected} <image> <flat-image>\` and point ${BASE_IMAGE_FIELDS.path} at the result`,
    );
  }
  const specific = isRecord(info['format-specific']) && isRecord(info['format-specific'].data) ? info['format-specific'].data : {};
  if (specific['data-file'] !== undefined) {
    throw new BaseImageError(
      'backing',
      `${what} keeps its data in an external file (${String(specific['data-file'])}); a base image must be self-contained. ` +
        `Rewrite it with \`qemu-img convert -O ${expected} <image> <self-contained-image>\``,
    );
  }
  if (specific.corrupt === true) {
    throw new BaseImageError('invalid', `${what} is marked corrupt by qemu-img; check it with \`qemu-img check\` or replace it`);
  }
  if (specific.encrypt !== undefined) {
    throw new BaseImageError('invalid', `${what} is encrypted; qemu would need a key for every VM. Use an unencrypted image`);
  }
  const actual = info['actual-size'];
  return { format, virtualSize: info['virtual-size'], actualSize: typeof actual === 'number' ? actual : 0 };
}

export function humanBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

/** Error text for a failed fetch/read, with the query string scrubbed in case a library echoed the URL. */
function describeError(err: unknown, url: URL): string {
  const parts: string[] = [];
  let e: unknown = err;
  for (let depth = 0; e !== undefined && e !== null && depth < 4; depth++) {
    if (e instanceof Error) {
      const code = (e as NodeJS.ErrnoException).code;
      parts.push(code && !e.message.includes(code) ? `${e.message} (${code})` : e.message);
      e = (e as { cause?: unknown }).cause;
    } else {
      parts.push(String(e));
      break;
    }
  }
  let text = parts.join(': ') || 'unknown error';
  if (url.search) text = text.split(url.search).join('?[redacted]');
  if (url.username || url.password) text = text.split(url.href).join(urlForLog(url));
  return text;
}

// ---------------------------------------------------------------- I/O edges

async function qemuImgInfo(binary: string, file: string, what: string): Promise<unknown> {
  // `-U` (force share): the agent may restart while VMs hold the base image open
  // as their backing file; info only reads, so sharing is safe. The path is
  // absolute, so qemu-img can take it neither for an option nor for a
  // `proto:` / `json:` pseudo-filename.
  const r = await execa(binary, ['info', '-U', '--output=json', file], {
    stdin: 'ignore',
    reject: false,
    timeout: QEMU_IMG_TIMEOUT_MS,
  });
  if ((r as { code?: string }).code === 'ENOENT') {
    throw new BaseImageError('bad-config', `cannot run ${binary}: not found. Install qemu-utils or set ${BASE_IMAGE_FIELDS.qemuImg}`);
  }
  if (r.exitCode !== 0) {
    const err = String(r.stderr ?? '').trim().slice(-1000) || (r.timedOut ? 'timed out' : `exit ${String(r.exitCode)}`);
    throw new BaseImageError('invalid', `${what}: qemu-img info failed: ${err}`);
  }
  try {
    return JSON.parse(String(r.stdout));
  } catch {
    throw new BaseImageError('invalid', `${what}: qemu-img info did not print JSON`);
  }
}

async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

interface DownloadResult {
  bytes: number;
  sha256: string;
  durationMs: number;
}

/** Stream `url` into `tmp` (created 0640, must not exist), hashing as it goes. Leaves `tmp` for the caller to clean up. */
async function downloadTo(
  url: URL,
  tmp: string,
  opts: { pinned: boolean; fetchImpl: typeof fetch; logger: Logger; progressEveryMs: number; maxBytes: number },
): Promise<DownloadResult> {
  const shown = urlForLog(url);
  const started = performance.now();
  let res: Response;
  try {
    res = await opts.fetchImpl(url, { redirect: 'follow' });
  } catch (err) {
    throw new BaseImageError('download', `could not fetch ${shown}: ${describeError(err, url)}. Check ${BASE_IMAGE_FIELDS.url} and the host's network`);
  }
  const cancel = () => res.body?.cancel().catch(() => undefined);
  if (!res.ok) {
    await cancel();
    throw new BaseImageError('download', `${shown} answered HTTP ${res.status}${res.statusText ? ` ${res.statusText}` : ''}; check ${BASE_IMAGE_FIELDS.url}`);
  }
  // fetch follows redirects, including https → http; an unpinned image must
  // still have arrived over TLS.
  if (res.url && !opts.pinned) {
    const final = new URL(res.url);
    if (final.protocol !== 'https:') {
      await cancel();
      throw new BaseImageError(
        'insecure-url',
        `${shown} redirected to plain ${final.protocol} (${urlForLog(final)}) and ${BASE_IMAGE_FIELDS.sha256} is not set; pin the image with ${BASE_IMAGE_FIELDS.sha256}`,
      );
    }
  }
  if (!res.body) throw new BaseImageError('download', `${shown} answered without a body`);

  // With a content-encoding, fetch decodes and Content-Length counts encoded bytes: useless for progress or truncation checks.
  const encoding = (res.headers.get('content-encoding') ?? 'identity').trim().toLowerCase();
  const lenHeader = res.headers.get('content-length');
  const total = encoding === 'identity' && lenHeader !== null && /^\d+$/.test(lenHeader.trim()) ? Number(lenHeader.trim()) : undefined;
  if (total !== undefined && total > opts.maxBytes) {
    await cancel();
    throw new BaseImageError('download', `${shown} is ${humanBytes(total)}, over the ${humanBytes(opts.maxBytes)} limit`);
  }

  const hash = createHash('sha256');
  let bytes = 0;
  let lastLog = started;
  let fh: Awaited<ReturnType<typeof open>>;
  try {
    fh = await open(tmp, 'wx', 0o640);
  } catch (err) {
    await cancel();
    throw new BaseImageError('io', `cannot create ${tmp}: ${(err as Error).message}; check the permissions of ${path.dirname(tmp)}`);
  }
  try {
    try {
      for await (const chunk of res.body) {
        bytes += chunk.byteLength;
        if (bytes > opts.maxBytes) {
          throw new BaseImageError('download', `${shown} sent more than the ${humanBytes(opts.maxBytes)} limit; aborted`);
        }
        hash.update(chunk);
        for (let off = 0; off < chunk.byteLength; ) {
          const { bytesWritten } = await fh.write(chunk, off, chunk.byteLength - off);
          off += bytesWritten;
        }
        const now = performance.now();
        if (now - lastLog >= opts.progressEveryMs) {
          lastLog = now;
          const seconds = (now - started) / 1000;
          opts.logger.info(
            {
              url: shown,
              bytes,
              totalBytes: total,
              percent: total ? Math.floor((bytes / total) * 1000) / 10 : undefined,
              bytesPerSecond: seconds > 0 ? Math.round(bytes / seconds) : undefined,
            },
            `downloading base image: ${humanBytes(bytes)}${total ? ` of ${humanBytes(total)}` : ''}`,
          );
        }
      }
    } catch (err) {
      if (err instanceof BaseImageError) throw err;
      throw new BaseImageError('download', `download of ${shown} broke off after ${bytes} bytes: ${describeError(err, url)}`);
    }
    // The stream may end "cleanly" short of Content-Length on some servers/proxies.
    if (total !== undefined && bytes !== total) {
      throw new BaseImageError('download', `download of ${shown} ended after ${bytes} of ${total} bytes`);
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  const durationMs = Math.round(performance.now() - started);
  const sha256 = hash.digest('hex');
  opts.logger.info(
    { url: shown, bytes, durationMs, sha256 },
    `downloaded base image: ${humanBytes(bytes)} in ${(durationMs / 1000).toFixed(1)} s`,
  );
  return { bytes, sha256, durationMs };
}

/** A `.part` untouched this long is a download that died with its agent (a live one writes all the time). */
const STALE_PART_MS = 60_000;

/**
 * Remove what downloads of `file` killed mid-way left behind (SIGKILL, power
 * loss: no `finally` ran), which can be gigabytes. Only names this module
 * makes, `.<name>.<12 hex>.part`, and only stale ones.
 */
async function sweepStaleParts(file: string, logger: Logger): Promise<void> {
  const dir = path.dirname(file);
  const prefix = `.${path.basename(file)}.`;
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    return; // no folder yet: nothing left behind
  }
  for (const name of names) {
    if (!name.startsWith(prefix) || !/^[0-9a-f]{12}\.part$/.test(name.slice(prefix.length))) continue;
    const part = path.join(dir, name);
    const st = await stat(part).catch(() => undefined);
    if (!st?.isFile() || Date.now() - st.mtimeMs < STALE_PART_MS) continue;
    await rm(part, { force: true });
    logger.info({ path: part, bytes: st.size }, 'removed a partial base image download left by an earlier run');
  }
}

async function ensureUncached(opts: EnsureBaseImageOptions & { path: string }): Promise<BaseImageInfo> {
  const file = opts.path;
  await sweepStaleParts(file, opts.logger);
  // Vet the config even when the image is already there: a bad URL is a bad
  // config, and it should fail now rather than on the day the image is deleted.
  const expectedSha = opts.sha256 !== undefined ? normalizeSha256(opts.sha256) : undefined;
  const url = opts.url !== undefined ? checkDownloadUrl(opts.url, expectedSha) : undefined;

  let present = false;
  try {
    const st = await stat(file);
    if (!st.isFile()) {
      throw new BaseImageError('invalid', `base image ${file} exists but is not a regular file; fix ${BASE_IMAGE_FIELDS.path}`);
    }
    present = true;
  } catch (err) {
    if (err instanceof BaseImageError) throw err;
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw new BaseImageError('io', `cannot stat base image ${file}: ${(err as Error).message}`);
    }
  }

  if (present) {
    const facts = checkImageInfo(await qemuImgInfo(opts.qemuImgBinary, file, `base image ${file}`), opts.format, `base image ${file}`);
    return { path: file, ...facts, downloaded: false };
  }

  if (url === undefined) {
    throw new BaseImageError(
      'missing',
      `base image ${file} does not exist. Put a ${opts.format} image there (${BASE_IMAGE_FIELDS.path} sets the path), ` +
        `or set ${BASE_IMAGE_FIELDS.url} (https, or http together with ${BASE_IMAGE_FIELDS.sha256}) and ${BASE_IMAGE_FIELDS.sha256} so the agent downloads it`,
    );
  }

  const dir = path.dirname(file);
  await mkdir(dir, { recursive: true, mode: 0o750 });
  const tmp = path.join(dir, `.${path.basename(file)}.${randomBytes(6).toString('hex')}.part`);
  const shown = urlForLog(url);
  opts.logger.info({ url: shown, path: file, pinned: expectedSha !== undefined }, 'base image missing; downloading it');
  let placed = false;
  try {
    const got = await downloadTo(url, tmp, {
      pinned: expectedSha !== undefined,
      fetchImpl: opts.fetchImpl ?? fetch,
      logger: opts.logger,
      progressEveryMs: opts.progressEveryMs ?? DEFAULT_PROGRESS_MS,
      maxBytes: opts.maxBytes ?? DEFAULT_MAX_BYTES,
    });
    if (expectedSha !== undefined && got.sha256 !== expectedSha) {
      throw new BaseImageError(
        'checksum',
        `the image downloaded from ${shown} has SHA-256 ${got.sha256}, expected ${expectedSha} (${BASE_IMAGE_FIELDS.sha256}); ` +
          `nothing was kept. Check that ${BASE_IMAGE_FIELDS.url} and ${BASE_IMAGE_FIELDS.sha256} name the same file`,
      );
    }
    const what = `the image downloaded from ${shown}`;
    const facts = checkImageInfo(await qemuImgInfo(opts.qemuImgBinary, tmp, what), opts.format, what);
    // Read-only before the rename, so the final path never shows a writable base.
    await chmod(tmp, 0o444);
    await rename(tmp, file);
    placed = true;
    await fsyncDir(dir);
    opts.logger.info({ path: file, format: facts.format, virtualSize: facts.virtualSize, sha256: got.sha256 }, 'base image in place');
    return { path: file, ...facts, downloaded: true };
  } finally {
    if (!placed) await rm(tmp, { force: true });
  }
}

/** Downloads (or checks) in progress, by absolute path: concurrent callers share one. */
const inFlight = new Map<string, Promise<BaseImageInfo>>();

/**
 * Make sure a usable base image is at `opts.path` and describe it.
 * Throws BaseImageError (with `problem`) when it is missing and cannot be
 * fetched, or when it (or what was fetched) is not a standalone image of
 * `opts.format`.
 */
export function ensureBaseImage(opts: EnsureBaseImageOptions): Promise<BaseImageInfo> {
  const file = path.resolve(opts.path);
  const running = inFlight.get(file);
  if (running) {
    return running.then((info) => {
      if (info.format !== opts.format) {
        throw new BaseImageError('format', `base image ${file} is ${info.format}, but ${BASE_IMAGE_FIELDS.format} is ${opts.format}`);
      }
      return info;
    });
  }
  const p = ensureUncached({ ...opts, path: file }).finally(() => {
    if (inFlight.get(file) === p) inFlight.delete(file);
  });
  inFlight.set(file, p);
  return p;
}
