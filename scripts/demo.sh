#!/usr/bin/env bash
# keibi demo: one folder on two machines, both on this one. Builds keibi,
# starts two complete peers, alice and bob (each a keibi-syncd with its own
# state directory and peer port on 127.0.0.1, and a keibi-mountd with its
# own mountpoint), pairs them, writes a file on alice's mount and reads it
# on bob's, edits it on bob and shows the edit on alice, writes 64 MiB of
# random bytes on alice and checks them on bob (bob fetches the chunks on
# demand, verified), prints `keibictl status` of both; then stops
# everything.
#
# Run as root on Debian 12 (or similar):   bash scripts/demo.sh [--keep]
#
#   --keep   leave both peers running, and print their mountpoints and how
#            to stop them.
#
# Installs what is missing with apt-get (fuse3, util-linux, python3, gcc
# for the linker); Rust itself (cargo, 1.95+) must already be installed
# (https://rustup.rs). keibi-syncd runs as the unprivileged user `nobody`,
# keibi-mountd as root. Logs: syncd.log and mountd.log in each peer's
# directory (printed on failure), with RUST_LOG honoured (default info).
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

require_root "it mounts FUSE filesystems and runs keibi-syncd as nobody"
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

KEIBI_WORK="$(mktemp -d /tmp/keibi-demo.XXXXXX)"
chmod 0755 "$KEIBI_WORK"
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    keibi_nodes_stop
    if [[ $rc -ne 0 ]]; then
        echo "demo.sh: failed; logs are in $KEIBI_WORK/{alice,bob}/{syncd,mountd}.log" >&2
    else
        rm -rf "$KEIBI_WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for n in alice bob; do
    echo "== starting $n: keibi-syncd as $KEIBI_SYNCD_USER, keibi-mountd on $KEIBI_WORK/$n/mnt"
    keibi_node_up "$n"
done
alice="$KEIBI_WORK/alice/mnt"
bob="$KEIBI_WORK/bob/mnt"

echo "== pairing: each adds the other's fingerprint (alice also gets bob's address)"
keibi_pair alice bob
keibi_node_ctl alice peer list

# Wait (bounded) until FILE reads as TEXT; prints how long it took.
wait_text() {
    local file="$1" text="$2" t0
    t0=$(date +%s%N)
    read_is() { [[ "$(cat "$1" 2>/dev/null)" == "$2" ]]; }
    if ! keibi_poll 30 read_is "$file" "$text"; then
        echo "demo.sh: $file did not show the change within 30 s" >&2
        exit 1
    fi
    echo "   (arrived after $((($(date +%s%N) - t0) / 1000000)) ms)"
}

echo "== alice writes hello.txt"
echo "hello from alice" >"$alice/hello.txt"
wait_text "$bob/hello.txt" "hello from alice"
echo "== bob reads it: $ cat $bob/hello.txt"
cat "$bob/hello.txt"

echo "== bob edits it"
echo "and an edit from bob" >>"$bob/hello.txt"
wait_text "$alice/hello.txt" "$(printf 'hello from alice\nand an edit from bob')"
echo "== alice sees the edit: $ cat $alice/hello.txt"
cat "$alice/hello.txt"

echo "== alice writes 64 MiB of random bytes; bob reads them (fetched on demand, each chunk verified)"
head -c $((64 * 1024 * 1024)) /dev/urandom >"$alice/random.bin"
want="$(sha256sum <"$alice/random.bin" | cut -d' ' -f1)"
size_is() { [[ "$(stat -c %s "$1" 2>/dev/null)" == "$2" ]]; }
if ! keibi_poll 30 size_is "$bob/random.bin" $((64 * 1024 * 1024)); then
    echo "demo.sh: random.bin did not reach bob within 30 s" >&2
    exit 1
fi
got="$(sha256sum <"$bob/random.bin" | cut -d' ' -f1)"
if [[ "$got" != "$want" ]]; then
    echo "demo.sh: random.bin differs on bob (sha256 $got, alice has $want)" >&2
    exit 1
fi
echo "random.bin: identical on both mounts (sha256 ${want:0:16}...)"
ls -l "$alice" "$bob"

echo "== keibictl status (alice)"
keibi_node_ctl alice status
echo "== keibictl status (bob)"
keibi_node_ctl bob status

if [[ $keep -eq 1 ]]; then
    trap - EXIT INT TERM
    cat <<MSG

keibi is running:
  alice:  mount $alice, keibi-syncd pid ${KEIBI_NODE_SYNCD_PID[alice]}, keibi-mountd pid ${KEIBI_NODE_MOUNTD_PID[alice]}
          $KEIBI_BIN/keibictl --socket $KEIBI_WORK/alice/run/control.sock status
  bob:    mount $bob, keibi-syncd pid ${KEIBI_NODE_SYNCD_PID[bob]}, keibi-mountd pid ${KEIBI_NODE_MOUNTD_PID[bob]}
          $KEIBI_BIN/keibictl --socket $KEIBI_WORK/bob/run/control.sock status

Stop them (mountd unmounts on SIGTERM, then syncd flushes and exits):
  kill -TERM ${KEIBI_NODE_MOUNTD_PID[alice]} ${KEIBI_NODE_MOUNTD_PID[bob]}; sleep 2
  kill -TERM ${KEIBI_NODE_SYNCD_PID[alice]} ${KEIBI_NODE_SYNCD_PID[bob]}
  rm -rf $KEIBI_WORK
MSG
    exit 0
fi

echo "== stopping (SIGTERM to both keibi-mountd, then both keibi-syncd)"
keibi_nodes_stop
for m in "$alice" "$bob"; do
    if [[ "$(findmnt -n -o FSTYPE --mountpoint "$m" 2>/dev/null)" == "fuse.keibi" ]]; then
        echo "demo.sh: the mount $m is still there after keibi-mountd stopped" >&2
        exit 1
    fi
done
echo "demo.sh: done; a file crossed from alice to bob and back"
