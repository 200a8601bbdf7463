#!/usr/bin/env bash
# System packages the agent and its tests need on Debian 12 / Ubuntu.
# qemu + qemu-img run the VMs; genisoimage makes the cloud-init seed; busybox-static
# and cpio build the tiny test guest; mmdebstrap builds the cloud-init test guest;
# openssh-client + sshpass log in to guests in tests; passt gives guests a
# network without a path to the host's loopback; nftables + iproute2 set up and
# fence the guests' taps (network "tap", `paygress-agent net up`).
# systemd-container (systemd-nspawn) and zstd boot the cached Debian root the
# real-systemd test runs the unit in.
set -euo pipefail
PKGS=(qemu-system-x86 qemu-utils genisoimage busybox-static cpio mmdebstrap e2fsprogs openssh-client sshpass passt nftables iproute2 ca-certificates systemd-container zstd)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "installed: ${missing[*]}"
fi
