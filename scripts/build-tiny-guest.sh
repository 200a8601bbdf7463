#!/usr/bin/env bash
# Build the tiny test guest: a Debian cloud kernel plus a busybox initramfs that
# brings up virtio networking and answers on port 22 with a fake SSH banner.
# It boots under `qemu-system-x86_64 -accel tcg -cpu max` in seconds, so driver
# tests can prove "the guest booted and its port 22 is reachable" without the
# minute-long boot of a real cloud-init image.
#
# Output (outside the repo, reused across runs):
#   ${PAYGRESS_CACHE_DIR:-$HOME/.cache/paygress-agent}/guests/tiny-vN/{vmlinuz,initrd.img,base.qcow2}
# (N = GUEST_VERSION: checkouts that expect different versions share one cache
# without rebuilding each other's guest.)
# Idempotent: does nothing when all three exist. Builds in a temp dir and
# renames into place, so an interrupted build never leaves half an output.
# Needs: apt-get (Debian package lists), dpkg-deb, cpio, gzip, qemu-img.
set -euo pipefail

CACHE_DIR="${PAYGRESS_CACHE_DIR:-$HOME/.cache/paygress-agent}"
# Bump when /init changes: a cached build with another version is rebuilt.
# Keep in step with TINY_GUEST_VERSION in test/support/tiny-guest.ts.
# 2: paygress.probe=ADDR:PORT connection probes (test/integration/guest-network.test.ts).
# 3: static network from the NoCloud seed's network-config (tap mode), DNS and
#    spoofed-source probes (test/integration/tap-network.test.ts).
GUEST_VERSION=3
OUT_DIR="$CACHE_DIR/guests/tiny-v$GUEST_VERSION"

complete() {
  [[ -f "$1/vmlinuz" && -f "$1/initrd.img" && -f "$1/base.qcow2" && "$(cat "$1/version" 2>/dev/null)" == "$GUEST_VERSION" ]]
}

if complete "$OUT_DIR"; then
  echo "$OUT_DIR"
  exit 0
fi

for tool in apt-get apt-cache dpkg-deb cpio gzip qemu-img; do
  command -v "$tool" >/dev/null || { echo "build-tiny-guest: missing tool: $tool" >&2; exit 1; }
done

mkdir -p "$CACHE_DIR/guests"
WORK="$(mktemp -d "$CACHE_DIR/guests/.tiny-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

# The metapackage names the current ABI's image package; download that one.
resolve_kernel_pkg() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | awk '/Depends: linux-image-[0-9].*-cloud-amd64/ {print $2; exit}'
}
KPKG="$(resolve_kernel_pkg)"
if [[ -z "$KPKG" && "$(id -u)" == 0 ]]; then
  # A fresh machine has no package lists yet.
  apt-get update -qq >/dev/null || true
  KPKG="$(resolve_kernel_pkg)"
fi
if [[ -z "$KPKG" ]]; then
  echo "build-tiny-guest: cannot resolve linux-image-cloud-amd64 (run 'apt-get update' first)" >&2
  exit 1
fi
# apt-get download warns when it cannot drop to _apt in a root-owned dir; harmless.
if ! apt-get download "$KPKG" busybox-static >"$WORK/apt.log" 2>&1; then
  # Lists can be stale (the ABI package was superseded): refresh once and retry.
  rm -f ./*.deb
  if [[ "$(id -u)" == 0 ]]; then apt-get update -qq >/dev/null || true; KPKG="$(resolve_kernel_pkg)"; fi
  apt-get download "$KPKG" busybox-static >"$WORK/apt.log" 2>&1 \
    || { echo "build-tiny-guest: apt-get download $KPKG busybox-static failed:" >&2; cat "$WORK/apt.log" >&2; exit 1; }
fi

mkdir -p pkg
for deb in ./*.deb; do dpkg-deb -x "$deb" pkg; done
KVER="${KPKG#linux-image-}"
MODDIR="pkg/lib/modules/$KVER"
[[ -f "pkg/boot/vmlinuz-$KVER" ]] || { echo "build-tiny-guest: no kernel in $KPKG" >&2; exit 1; }
BUSYBOX="pkg/bin/busybox"
[[ -x "$BUSYBOX" ]] || { echo "build-tiny-guest: no busybox in busybox-static" >&2; exit 1; }

# --- initramfs ---
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,etc,lib/modules}
cp "$BUSYBOX" "$ROOT/bin/busybox"

# Modules: the kernel package ships no modules.dep (depmod runs at install
# time), so dependencies are read from each module's .modinfo `depends=` field
# and resolved here; /init then insmods them in dependency order. Modules that
# are built in (modules.builtin) are skipped.
declare -A SEEN=()
ORDER=()
find_module() { find "$MODDIR/kernel" -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" | head -n1; }
add_module() {
  local name="$1" file deps dep
  [[ -n "${SEEN[$name]:-}" ]] && return 0
  SEEN[$name]=1
  if grep -qE "/${name//_/[_-]}\.ko(\.[a-z]+)?$" "$MODDIR/modules.builtin" 2>/dev/null; then
    return 0
  fi
  file="$(find_module "$name")"
  [[ -n "$file" ]] || { echo "build-tiny-guest: module $name not found" >&2; exit 1; }
  case "$file" in
    *.xz) xz -dc "$file" >"$WORK/$name.ko" ;;
    *.zst) zstd -qdc "$file" >"$WORK/$name.ko" ;;
    *) cp "$file" "$WORK/$name.ko" ;;
  esac
  deps="$(grep -a -o 'depends=[A-Za-z0-9_,-]*' "$WORK/$name.ko" | head -n1 | cut -d= -f2)"
  for dep in ${deps//,/ }; do add_module "$dep"; done
  cp "$WORK/$name.ko" "$ROOT/lib/modules/$name.ko"
  ORDER+=("$name")
}
for m in virtio_pci virtio_net virtio_blk isofs; do add_module "$m"; done
printf '%s\n' "${ORDER[@]}" >"$ROOT/lib/modules/load-order"

# The fake sshd: one line, like the first line a real sshd sends.
cat >"$ROOT/bin/banner" <<'EOF'
#!/bin/busybox sh
echo "SSH-2.0-paygress-tiny"
EOF

cat >"$ROOT/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /lib/modules/load-order); do
  insmod "/lib/modules/$m.ko" || echo "paygress-tiny-guest: insmod $m failed"
done
# hostname=NAME on the kernel command line, if given.
for arg in $(cat /proc/cmdline); do
  case "$arg" in hostname=*) hostname "${arg#hostname=}" ;; esac
done
ip link set lo up
# virtio-net may appear a moment after insmod returns.
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ip link set eth0 up
# A NoCloud seed with a network-config (tap mode: a /30 per guest) sets the
# address, gateway and resolver; without one, qemu user-mode's fixed layout.
# A busybox reading of the YAML the driver writes (cloud-config.ts): the
# first CIDR is the address, `via:` the gateway, the last bare address the resolver.
addr=10.0.2.15/24; gw=10.0.2.2; dns=10.0.2.3
mkdir -p /seed
for d in /dev/vd?; do
  mount -t iso9660 -o ro "$d" /seed 2>/dev/null || continue
  if [ -f /seed/network-config ]; then
    addr="$(grep -o '[0-9][0-9.]*/[0-9]*' /seed/network-config | grep -v '^0\.0\.0\.0/' | head -n1)"
    gw="$(sed -n 's/.*via: *//p' /seed/network-config | head -n1)"
    dns="$(sed -n '/nameservers:/,$p' /seed/network-config | grep -o '[0-9][0-9.]*[0-9]' | tail -n1)"
    echo "paygress-tiny-guest: network-config address=$addr gateway=$gw dns=$dns"
  fi
  umount /seed
done
ip addr add "$addr" dev eth0
ip route add default via "$gw"
echo "nameserver $dns" >/etc/resolv.conf
nc -ll -p 22 -e /bin/banner &
echo "paygress-tiny-guest: up hostname=$(hostname)"
# paygress.probe=ADDR:PORT (repeatable): try to connect from the guest and
# print what the other end sent, e.g. whether the host's loopback services are
# reachable through the gateway. ADDR 127.x is routed out through eth0 (what a
# hostile guest could do), not to the guest's own loopback.
for arg in $(cat /proc/cmdline); do
  case "$arg" in paygress.probe=*)
    t="${arg#paygress.probe=}"; h="${t%:*}"; p="${t##*:}"
    case "$h" in 127.*)
      sysctl -qw net.ipv4.conf.eth0.route_localnet=1
      ip route del local 127.0.0.0/8 dev lo table local 2>/dev/null
      ip route del local 127.0.0.1 dev lo table local 2>/dev/null
      ip route replace "$h" via "$gw" dev eth0 ;;
    esac
    r="$( (sleep 4) | nc -w 4 "$h" "$p" 2>&1 | head -c 120 | tr -d '\r\n')"
    echo "paygress-probe: $t -> ${r:-nothing}"
    ;;
  # paygress.dns=NAME: resolve NAME through the configured resolver.
  paygress.dns=*)
    n="${arg#paygress.dns=}"
    r="$(nslookup "$n" 2>&1 | sed -n 's/^Address: *//p' | tail -n1)"
    echo "paygress-dns: $n -> ${r:-nothing}"
    ;;
  # paygress.spoof=SRC/DST/NAME: send a DNS query for NAME to DST from the
  # forged source SRC (a UDP query needs no answer to be seen arriving).
  paygress.spoof=*)
    t="${arg#paygress.spoof=}"; src="${t%%/*}"; rest="${t#*/}"; dst="${rest%%/*}"; n="${rest#*/}"
    ip addr add "$src/32" dev eth0
    ip route replace "$dst" via "$gw" dev eth0 src "$src"
    nslookup "$n" "$dst" >/dev/null 2>&1
    ip route del "$dst" 2>/dev/null
    ip addr del "$src/32" dev eth0
    echo "paygress-spoof: $t sent"
    ;;
  esac
done
echo "paygress-probe: done"
# PID 1 must not exit.
while true; do sleep 3600; done
EOF
chmod 0755 "$ROOT/init" "$ROOT/bin/banner" "$ROOT/bin/busybox"

(cd "$ROOT" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -9 >"$WORK/initrd.img"
cp "pkg/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
# An empty base disk: the driver always makes a qcow2 overlay on a base, and
# the tiny guest never mounts it.
qemu-img create -q -f qcow2 "$WORK/base.qcow2" 1G

STAGE="$CACHE_DIR/guests/.tiny-out.$$"
mkdir -p "$STAGE"
mv "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/base.qcow2" "$STAGE/"
echo "$KVER" >"$STAGE/kernel-version"
echo "$GUEST_VERSION" >"$STAGE/version"
# Another build may have won the race: keep a complete output that appeared
# meanwhile; replace only an incomplete or outdated leftover.
if complete "$OUT_DIR"; then
  rm -rf "$STAGE"
else
  rm -rf "$OUT_DIR"
  mv -T "$STAGE" "$OUT_DIR" 2>/dev/null || rm -rf "$STAGE"
fi
echo "$OUT_DIR"
