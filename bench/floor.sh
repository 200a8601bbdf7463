#!/usr/bin/env bash
# The bare floor of a spawn: the same three steps the KVM driver takes (disk
# overlay, NoCloud seed ISO, `qemu -daemonize` with its pidfile), run straight
# from a shell with nothing around them: no Nostr, no agent, no Node.
#
# usage: floor.sh WORKDIR BASE_IMAGE BASE_FORMAT DISK_GB SEED_SRC_DIR ARGV_FILE
#   ARGV_FILE holds qemu's arguments NUL-separated, produced by the agent's own
#   argv builder (bench/run.ts), so the floor launches exactly the same VM.
# Prints one JSON line of step times in milliseconds. Leaves qemu running
# (its pid is in WORKDIR/qemu.pid); the caller stops it and removes WORKDIR.
set -euo pipefail

dir=$1 base=$2 fmt=$3 disk_gb=$4 seed_src=$5 argv_file=$6
qemu=${QEMU_BINARY:-qemu-system-x86_64}

now_ns() { date +%s%N; }
ms() { echo $(( ($2 - $1) / 1000000 )).$(( (($2 - $1) / 1000) % 1000 / 100 )); }

mapfile -d '' qemu_args < "$argv_file"

t0=$(now_ns)
qemu-img create -q -f qcow2 -b "$base" -F "$fmt" "$dir/disk.qcow2" "${disk_gb}G"
t1=$(now_ns)
(cd "$seed_src" && genisoimage -quiet -output "$dir/seed.iso" -volid cidata -joliet -rock user-data meta-data)
t2=$(now_ns)
"$qemu" "${qemu_args[@]}" < /dev/null > /dev/null
t3=$(now_ns)
# The daemonizing parent returns once the pidfile is written; check, do not wait.
[[ -s "$dir/qemu.pid" ]] || { echo "floor: no pidfile after qemu returned" >&2; exit 1; }

printf '{"overlay_ms":%s,"seed_ms":%s,"qemu_ms":%s,"total_ms":%s}\n' \
  "$(ms "$t0" "$t1")" "$(ms "$t1" "$t2")" "$(ms "$t2" "$t3")" "$(ms "$t0" "$t3")"
