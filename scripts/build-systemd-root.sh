#!/usr/bin/env bash
# Build the Debian 12 root that the real-systemd test boots with
# `systemd-nspawn -b`: systemd as PID 1, dbus, and what README's install
# section and the agent need (qemu, qemu-img, genisoimage). Node is not in it:
# the test binds the host's node in, and the root has the libstdc++ it links.
#
# Output (cached outside the repo, like the guest images):
#   ${PAYGRESS_CACHE_DIR:-$HOME/.cache/paygress-agent}/systemd-root/
#     root.tar.zst  version
#
# - Debian packages only, from the mirror apt on this machine uses
#   (override with PAYGRESS_DEBIAN_MIRROR / PAYGRESS_DEBIAN_SECURITY_MIRROR).
# - Idempotent: exits at once when the tarball of this VERSION exists; a failed
#   or interrupted build never leaves a usable-looking output behind.
# - Needs root (mmdebstrap --mode=root keeps file owners in the tarball).
set -euo pipefail

# Bump when the package list or the hooks change: an older cached root is rebuilt.
VERSION=1
CACHE_DIR="${PAYGRESS_CACHE_DIR:-$HOME/.cache/paygress-agent}"
OUT_DIR="$CACHE_DIR/systemd-root"
PACKAGES=(
  systemd systemd-sysv dbus libstdc++6 ca-certificates
  qemu-system-x86 qemu-utils genisoimage
  # procps: /bin/kill for the unit's ExecReload, as on any ordinary host
  procps
)

log() { printf '[build-systemd-root] %s\n' "$*" >&2; }

up_to_date() { [[ -s "$OUT_DIR/root.tar.zst" && "$(cat "$OUT_DIR/version" 2>/dev/null)" == "$VERSION" ]]; }

if up_to_date; then
  log "up to date: $OUT_DIR"
  echo "$OUT_DIR"
  exit 0
fi
if [[ $EUID -ne 0 ]]; then
  log "must run as root (mmdebstrap --mode=root keeps file owners)"
  exit 1
fi
for tool in mmdebstrap zstd flock; do
  command -v "$tool" >/dev/null || { log "missing tool: $tool (bash scripts/install-deps.sh)"; exit 1; }
done

# shellcheck source=lib/debian-mirror.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/debian-mirror.sh"

mkdir -p "$OUT_DIR"
exec 9>"$OUT_DIR/.lock"
flock 9
if up_to_date; then
  log "built by a concurrent run: $OUT_DIR"
  echo "$OUT_DIR"
  exit 0
fi

START=$(date +%s)
TMP="$OUT_DIR/.root.tar.zst.$$"
trap 'rm -f "$TMP"' EXIT
log "mmdebstrap bookworm from $MIRROR (a few minutes on first build)"
# The hooks: no getty fighting the test for a console; a machine-id so journald
# and dbus start cleanly; policy-rc.d so no daemon starts during the build.
mmdebstrap --mode=root --variant=apt --format=tar \
  --include="$(IFS=,; echo "${PACKAGES[*]}")" \
  --customize-hook='chroot "$1" systemctl mask console-getty.service getty@tty1.service systemd-networkd-wait-online.service' \
  --customize-hook='echo paygress-test > "$1/etc/hostname"' \
  --customize-hook='rm -f "$1/etc/machine-id"; : > "$1/etc/machine-id"' \
  bookworm - \
  "deb $MIRROR bookworm main" \
  "deb $MIRROR bookworm-updates main" \
  "deb $SECURITY_MIRROR bookworm-security main" \
  | zstd -q -T0 -3 -o "$TMP"
mv "$TMP" "$OUT_DIR/root.tar.zst"
echo "$VERSION" > "$OUT_DIR/version"
log "built in $(( $(date +%s) - START )) s: $OUT_DIR/root.tar.zst ($(du -h "$OUT_DIR/root.tar.zst" | cut -f1))"
echo "$OUT_DIR"
