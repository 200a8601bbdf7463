#!/usr/bin/env bash
# Build the "cloud" test guest: Debian bookworm with real cloud-init (22.4) and
# openssh-server, booted by qemu with -kernel/-initrd (no bootloader), so the
# KVM driver can be tested end to end against the same cloud-config a stock
# Debian/Ubuntu cloud image would get.
#
# Output (cached outside the repo, reused by every test run):
#   ${PAYGRESS_CACHE_DIR:-$HOME/.cache/paygress-agent}/guests/cloud-vN/
#     vmlinuz  initrd.img  base.qcow2  append  version
# (N = GUEST_VERSION: checkouts that expect different versions share one cache
# without rebuilding each other's guest.)
#
# - Debian packages only, from the apt mirror this machine is configured with
#   (override with PAYGRESS_DEBIAN_MIRROR / PAYGRESS_DEBIAN_SECURITY_MIRROR).
# - No loop devices: mmdebstrap into a folder, then `mkfs.ext4 -d`.
# - Idempotent: exits at once when all outputs exist. Builds in a temp dir on the
#   same filesystem and renames the finished folder into place, so a failed or
#   interrupted build never leaves a usable-looking output behind.
# - Needs root (mmdebstrap in root mode; mkfs.ext4 -d keeps file ownership).
set -euo pipefail

CACHE_DIR="${PAYGRESS_CACHE_DIR:-$HOME/.cache/paygress-agent}"
GUESTS_DIR="$CACHE_DIR/guests"
# Bump when the image's contents change: a cached build with another version is rebuilt.
# Keep in step with CLOUD_GUEST_VERSION in test/support/cloud-guest.ts.
# 2: qemu-guest-agent, so the warm pool can hand an idle VM to a tenant.
GUEST_VERSION=2
OUT_DIR="$GUESTS_DIR/cloud-v$GUEST_VERSION"
OUTPUTS=(vmlinuz initrd.img base.qcow2 append version)
# The root filesystem carries this label; the kernel finds it through the initrd.
APPEND="root=LABEL=rootfs rw console=ttyS0"
IMAGE_SIZE="${PAYGRESS_CLOUD_GUEST_SIZE:-2G}"

log() { printf '[build-cloud-guest] %s\n' "$*" >&2; }

outputs_complete() {
  local f
  for f in "${OUTPUTS[@]}"; do
    [[ -s "$OUT_DIR/$f" ]] || return 1
  done
  [[ "$(cat "$OUT_DIR/version")" == "$GUEST_VERSION" ]]
}

if outputs_complete; then
  log "up to date: $OUT_DIR"
  echo "$OUT_DIR"
  exit 0
fi

if [[ $EUID -ne 0 ]]; then
  log "must run as root (mmdebstrap --mode=root, and mkfs.ext4 -d must keep file owners)"
  exit 1
fi
for tool in mmdebstrap mkfs.ext4 qemu-img flock; do
  command -v "$tool" >/dev/null || { log "missing tool: $tool"; exit 1; }
done

# shellcheck source=lib/debian-mirror.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/debian-mirror.sh"

mkdir -p "$GUESTS_DIR"
# One build at a time: a second caller waits, then finds the outputs in place.
exec 9>"$GUESTS_DIR/.cloud-v$GUEST_VERSION.lock"
flock 9
if outputs_complete; then
  log "built by a concurrent run: $OUT_DIR"
  echo "$OUT_DIR"
  exit 0
fi

START=$(date +%s)
WORK=$(mktemp -d "$GUESTS_DIR/.cloud-v$GUEST_VERSION-build.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
ROOTFS="$WORK/rootfs"
STAGE="$WORK/out"
mkdir -p "$STAGE"

PACKAGES=(
  systemd-sysv udev cloud-init openssh-server linux-image-cloud-amd64
  iproute2 netbase
  # cc_resizefs grows the root filesystem (no partition table: the ext4 fills
  # the whole virtual disk, so resize2fs alone reaches the overlay's size).
  e2fsprogs
  # cloud-init's NoCloud datasource reads the seed ISO (volume id "cidata") via blkid + mount.
  util-linux
  # The warm pool's hand-off channel (virtio-serial port org.qemu.guest_agent.0);
  # its unit starts only when qemu offers that port, so cold VMs never run it.
  qemu-guest-agent
)

log "mirror: $MIRROR  security: $SECURITY_MIRROR"
log "mmdebstrap bookworm -> $ROOTFS"
# The customize hook runs once everything is installed; "$1" is the rootfs.
# It is a here-doc passed as a string so it lives next to the package list.
CUSTOMIZE=$(cat <<'HOOK'
set -eu
R="$1"

# cloud-init: only look for a NoCloud seed (skips probing for ~15 clouds), never
# spend ~10 s under TCG generating an RSA host key, no locale generation.
cat >"$R/etc/cloud/cloud.cfg.d/05-paygress-guest.cfg" <<'EOF'
# Written by paygress-agent scripts/build-cloud-guest.sh
datasource_list: [NoCloud, None]
ssh_genkeytypes: [ed25519, ecdsa]
locale: C.UTF-8
EOF

# Locale: C.UTF-8 is built into libc, nothing to generate.
echo 'LANG=C.UTF-8' >"$R/etc/default/locale"

# Network: systemd-networkd does DHCP on the first virtio NIC (qemu user-net).
# cloud-init also renders its fallback config for networkd; either file works.
mkdir -p "$R/etc/systemd/network"
cat >"$R/etc/systemd/network/90-paygress-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
EOF
chroot "$R" systemctl enable systemd-networkd.service
# qemu user-net's built-in DNS forwarder; no resolver daemon needed for tests.
rm -f "$R/etc/resolv.conf"
echo 'nameserver 10.0.2.3' >"$R/etc/resolv.conf"

cat >"$R/etc/fstab" <<'EOF'
LABEL=rootfs / ext4 rw,errors=remount-ro 0 1
EOF
echo localhost >"$R/etc/hostname"

# Units a throwaway VM does not need; each costs seconds under TCG.
# (getty-static starts gettys on tty2-6 when logind is absent; there is no
# VGA console under -nodefaults anyway. The serial getty stays for debugging.)
for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
         e2scrub_reap.service fstrim.timer systemd-timesyncd.service \
         getty@tty1.service getty-static.service systemd-pstore.service \
         cloud-init-hotplugd.socket systemd-networkd-wait-online.service \
         systemd-binfmt.service proc-sys-fs-binfmt_misc.automount \
         dev-hugepages.mount dev-mqueue.mount sys-kernel-debug.mount \
         sys-kernel-tracing.mount sys-fs-fuse-connections.mount; do
  chroot "$R" systemctl mask "$u" >/dev/null 2>&1 || true
done

# Every VM must get its own identity: no host keys or machine-id baked in.
rm -f "$R"/etc/ssh/ssh_host_*
: >"$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id"
rm -rf "$R/var/lib/cloud"/*

# Small initrd: only what finds and mounts a virtio disk (MODULES=most puts
# hundreds of drivers into it, which costs decompression time under TCG).
mkdir -p "$R/etc/initramfs-tools/conf.d"
echo 'MODULES=list' >"$R/etc/initramfs-tools/conf.d/paygress.conf"
printf '%s\n' virtio_pci virtio_blk virtio_scsi sd_mod ext4 crc32c_generic >>"$R/etc/initramfs-tools/modules"
chroot "$R" update-initramfs -u -k all

# Keep the image small.
rm -rf "$R"/usr/share/doc/* "$R"/usr/share/man/* "$R"/usr/share/info/* \
       "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/* "$R"/var/cache/debconf/*-old \
       "$R"/var/log/*.log "$R"/var/log/apt/*
find "$R/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
HOOK
)


# Docs, man pages and translations are never unpacked (dpkg path filters).
mmdebstrap \
  --mode=root --variant=minbase \
  --include="$(IFS=,; echo "${PACKAGES[*]}")" \
  --aptopt='Acquire::Languages "none"' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --customize-hook="$CUSTOMIZE" \
  bookworm "$ROOTFS" \
  "deb $MIRROR bookworm main" \
  "deb $MIRROR bookworm-updates main" \
  "deb $SECURITY_MIRROR bookworm-security main"

# /vmlinuz and /initrd.img are symlinks to the versioned files in /boot.
cp -L "$ROOTFS/vmlinuz" "$STAGE/vmlinuz"
cp -L "$ROOTFS/initrd.img" "$STAGE/initrd.img"

log "mkfs.ext4 -d ($IMAGE_SIZE)"
mkfs.ext4 -q -F -d "$ROOTFS" -L rootfs "$WORK/root.raw" "$IMAGE_SIZE"
rm -rf "$ROOTFS"
log "qemu-img convert -c"
qemu-img convert -c -O qcow2 "$WORK/root.raw" "$STAGE/base.qcow2"
rm -f "$WORK/root.raw"
printf '%s\n' "$APPEND" >"$STAGE/append"
printf '%s\n' "$GUEST_VERSION" >"$STAGE/version"
chmod 0644 "$STAGE"/*
chmod 0755 "$STAGE"

# Replace any incomplete previous output, then publish atomically.
if [[ -e "$OUT_DIR" ]]; then
  mv "$OUT_DIR" "$WORK/old"
fi
mv "$STAGE" "$OUT_DIR"

END=$(date +%s)
log "built in $((END - START)) s: $(du -sh "$OUT_DIR/base.qcow2" | cut -f1) base.qcow2, $(du -sh "$OUT_DIR/initrd.img" | cut -f1) initrd.img"
echo "$OUT_DIR"
