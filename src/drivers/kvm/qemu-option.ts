/**
 * Escaping for values interpolated into qemu's `key=value,key=value` option
 * strings. qemu's option parser treats `,` as a separator and `,,` as a literal
 * comma, so a path such as `/srv/vms/a,b` must become `/srv/vms/a,,b` or it
 * would be split and the tail read as another option (an injection vector).
 * Control characters have no legitimate use in a path or address and are
 * rejected rather than escaped.
 */
export class QemuOptionError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'QemuOptionError';
  }
}

// eslint-disable-next-line no-control-regex
const CONTROL = /[\u0000-\u001f\u007f]/;

export function qemuOptionValue(value: string): string {
  if (value.length === 0) throw new QemuOptionError('empty value in a qemu option');
  if (CONTROL.test(value)) throw new QemuOptionError('control character in a qemu option value');
  return value.replaceAll(',', ',,');
}

/** For values that stand alone as one argv element (e.g. `-kernel PATH`): no comma parsing, but still no control characters. */
export function qemuPlainValue(value: string): string {
  if (value.length === 0) throw new QemuOptionError('empty qemu argument');
  if (CONTROL.test(value)) throw new QemuOptionError('control character in a qemu argument');
  return value;
}
