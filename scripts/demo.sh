#!/usr/bin/env bash
# keibi demo: build keibi, run keibi-syncd and keibi-mountd on a temporary
# state directory and mountpoint, write a file through the mount, read it
# back and compare, show `keibictl status`; then start a second
# keibi-syncd (a peer on the same machine, on 127.0.0.1), pair the two,
# wait for their encrypted channel, show `keibictl peer list` and move
# 256 MiB through the channel with `keibictl peer bench`; then stop
# everything. (Sharing the folder's files between peers is not built yet.)
#
# Run as root on Debian 12 (or similar):   bash scripts/demo.sh [--keep]
#
#   --keep   leave both daemons and the mount running, and print how to
#            stop them and remove the temporary directory.
#
# Installs what is missing with apt-get (fuse3, util-linux, gcc for the
# linker); Rust itself (cargo, 1.95+) must already be installed
# (https://rustup.rs). keibi-syncd runs as the unprivileged user `nobody`,
# keibi-mountd as root. Logs: syncd.log and mountd.log in the temporary
# directory (printed), with RUST_LOG honoured (default info).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/packages.sh
. "$repo/scripts/lib/packages.sh"
# shellcheck source=scripts/lib/daemons.sh
. "$repo/scripts/lib/daemons.sh"

keep=0
for arg in "$@"; do
    case "$arg" in
        --keep) keep=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "demo.sh: unknown option $arg (see --help)" >&2
            exit 2
            ;;
    esac
done

require_root "it mounts a FUSE filesystem and runs keibi-syncd as nobody"
find_cargo
need_command fusermount3 fuse3
need_command findmnt util-linux
need_command setpriv util-linux
need_command python3 python3
need_command cc gcc
install_needed
if [[ ! -e /dev/fuse ]]; then
    modprobe fuse 2>/dev/null || true
fi
if [[ ! -c /dev/fuse ]]; then
    echo "demo.sh: /dev/fuse is missing (a container without FUSE? start it with --device /dev/fuse --cap-add SYS_ADMIN)" >&2
    exit 1
fi

echo "== building keibi (release)"
(cd "$repo" && cargo build --release --workspace --bins)
KEIBI_BIN="$repo/target/release"

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    keibi_stop
    if [[ $rc -ne 0 ]]; then
        echo "demo.sh: failed; logs are in $KEIBI_WORK (syncd.log, mountd.log)" >&2
    else
        rm -rf "$KEIBI_WORK"
    fi
    exit "$rc"
}

keibi_setup_workdir "$(mktemp -d /tmp/keibi-demo.XXXXXX)"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "== starting keibi-syncd as $KEIBI_SYNCD_USER (state: $KEIBI_STATE)"
keibi_start_syncd
echo "== starting keibi-mountd on $KEIBI_MNT"
keibi_start_mountd
keibi_wait_mounted
findmnt --mountpoint "$KEIBI_MNT"

echo "== writing a file through the mount and reading it back"
sample="$KEIBI_WORK/sample.bin"
head -c $((8 * 1024 * 1024)) /dev/urandom >"$sample"
mkdir "$KEIBI_MNT/hello"
echo "hello from keibi" >"$KEIBI_MNT/hello/greeting.txt"
cp "$sample" "$KEIBI_MNT/hello/random.bin"
sync "$KEIBI_MNT/hello/random.bin"
cat "$KEIBI_MNT/hello/greeting.txt"
if cmp "$sample" "$KEIBI_MNT/hello/random.bin"; then
    echo "random.bin: 8 MiB written and read back identical ($(sha256sum <"$sample" | cut -c1-16)...)"
else
    echo "demo.sh: the file read back differs from what was written" >&2
    exit 1
fi
ls -l "$KEIBI_MNT/hello"

echo "== keibictl status"
"$KEIBI_BIN/keibictl" --socket "$KEIBI_CONTROL_SOCK" status

echo "== a second keibi-syncd (peer \"b\", no mount), listening on 127.0.0.1"
keibi_start_peer peer-b
ctl_a() { "$KEIBI_BIN/keibictl" --socket "$KEIBI_CONTROL_SOCK" "$@"; }
ctl_b() { "$KEIBI_BIN/keibictl" --socket "$KEIBI_PEER_CONTROL_SOCK" "$@"; }
fingerprint() { python3 -c 'import json, sys; print(json.load(sys.stdin)["fingerprint"])'; }
fp_a="$(ctl_a id --json | fingerprint)"
fp_b="$(ctl_b id --json | fingerprint)"
ctl_b id
echo "== pairing: each side adds the other's fingerprint (a also gets b's address)"
ctl_b peer add "$fp_a" --name a
ctl_a peer add "$fp_b" --name b --addr "127.0.0.1:$KEIBI_PEER_PORT"
peer_connected() {
    ctl_a peer list --json | python3 -c '
import json, sys
sys.exit(0 if any(p["fingerprint"] == sys.argv[1] and p["state"] == "connected" for p in json.load(sys.stdin)) else 1)' "$fp_b"
}
if ! keibi_poll 30 peer_connected; then
    echo "demo.sh: the two keibi-syncd did not connect within 30 s; logs: $KEIBI_WORK/syncd.log, $KEIBI_WORK/peer-b/syncd.log" >&2
    exit 1
fi
ctl_a peer list
echo "== 256 MiB from b to a through the encrypted channel"
ctl_a peer bench "$fp_b" --bytes 256MiB --streams 2

if [[ $keep -eq 1 ]]; then
    trap - EXIT INT TERM
    cat <<MSG

keibi is running:
  mount:         $KEIBI_MNT
  keibi-syncd:   pid $KEIBI_SYNCD_PID (user $KEIBI_SYNCD_USER), state $KEIBI_STATE, log $KEIBI_WORK/syncd.log
  keibi-mountd:  pid $KEIBI_MOUNTD_PID, log $KEIBI_WORK/mountd.log
  status:        $KEIBI_BIN/keibictl --socket $KEIBI_CONTROL_SOCK status
  peer b:        pid ${KEIBI_PEER_PIDS[0]}, $KEIBI_BIN/keibictl --socket $KEIBI_PEER_CONTROL_SOCK peer list

Stop it (mountd unmounts on SIGTERM, then syncd flushes and exits):
  kill -TERM $KEIBI_MOUNTD_PID; while kill -0 $KEIBI_MOUNTD_PID 2>/dev/null; do sleep 0.2; done
  kill -TERM $KEIBI_SYNCD_PID ${KEIBI_PEER_PIDS[0]}
  rm -rf $KEIBI_WORK
MSG
    exit 0
fi

echo "== stopping (SIGTERM to keibi-mountd, then keibi-syncd)"
keibi_stop
if keibi_is_mounted; then
    echo "demo.sh: the mount is still there after keibi-mountd stopped" >&2
    exit 1
fi
echo "demo.sh: done; keibi works on this machine"
