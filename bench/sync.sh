#!/usr/bin/env bash
# keibi sync benchmark: two complete peers on this machine, alice and bob
# (as scripts/demo.sh starts them: own keibi-syncd, state directory, peer
# port on 127.0.0.1, keibi-mountd and mountpoint), paired, and three
# figures:
#
#   propagation   --files times (default 200): a new file of 4 KiB + i
#                 bytes is written and closed on alice's mount; the time
#                 until `stat` of it on bob's mount shows the final size
#                 (polled every 0.2 ms); p50, p90, p99 and max in ms
#                 (goal: p99 under 100 ms on loopback)
#   cold read     a --size-mib MiB file (default 1024) written on alice,
#                 read sequentially once on bob's mount (dd bs=1M, the
#                 page cache dropped first, every byte fetched from alice
#                 and verified), next to the same file read through sshfs
#                 from an sshd on 127.0.0.1; MB/s (10^6 bytes/s) and the
#                 keibi/sshfs ratio (goal: at least 4), and the CPU
#                 seconds per GiB of alice's syncd, bob's syncd and bob's
#                 mountd during the read (user + system, /proc/PID/stat),
#                 of the whole machine (every process and kernel thread,
#                 /proc/stat) with the share of its CPUs that was busy,
#                 and each daemon's context switches per 256 KiB chunk
#   one-chunk     4 KiB overwritten in the middle of that file on alice;
#   edit          the bytes bob received from alice (keibictl peer list
#                 --json, bytes_received) until bob reads the new bytes,
#                 next to the file's size
#
# Run as root:   bash bench/sync.sh [--files N] [--size-mib N] [--no-sshfs]
#                                    [--perf DIR] [--bin DIR]
#
# --bin DIR uses the keibi binaries in DIR (keibi-syncd, keibi-mountd and
# keibictl) instead of building the release binaries, to compare two
# builds.
#
# --perf DIR records a profile of alice's syncd, bob's syncd and bob's
# mountd during the cold read (`perf record -g`, needs perf) into
# DIR/{alice-syncd,bob-syncd,bob-mountd}.data; read them with
# `perf report -i FILE`.
#
# Builds the release binaries first (cargo must be installed); installs
# fuse3, util-linux, python3, gcc, and (unless --no-sshfs) openssh-server
# and sshfs when missing. Everything runs on this machine and stops on
# exit; logs are kept in the work directory when something fails.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/packages.sh
. "$repo/scripts/lib/packages.sh"
# shellcheck source=scripts/lib/daemons.sh
. "$repo/scripts/lib/daemons.sh"

files=200
size_mib=1024
with_sshfs=1
perf_dir=""
bin_dir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --perf) perf_dir="$2"; shift 2 ;;
        --bin) bin_dir="$2"; shift 2 ;;
        --files) files="$2"; shift 2 ;;
        --size-mib) size_mib="$2"; shift 2 ;;
        --no-sshfs) with_sshfs=0; shift ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "sync.sh: unknown option $1 (see --help)" >&2
            exit 2
            ;;
    esac
done

require_root "it mounts FUSE filesystems, drops the page cache and runs keibi-syncd as nobody"
find_cargo
need_command fusermount3 fuse3
need_command findmnt util-linux
need_command setpriv util-linux
need_command python3 python3
need_command cc gcc
[[ -z "$perf_dir" ]] || need_command perf linux-perf
if [[ $with_sshfs -eq 1 ]]; then
    need_command sshfs sshfs
    [[ -x /usr/sbin/sshd ]] || need_package openssh-server
fi
install_needed

if [[ -n "$bin_dir" ]]; then
    for b in keibi-syncd keibi-mountd keibictl; do
        [[ -x "$bin_dir/$b" ]] || { echo "sync.sh: no $b in $bin_dir" >&2; exit 2; }
    done
    KEIBI_BIN="$(cd "$bin_dir" && pwd)"
    echo "== keibi binaries from $KEIBI_BIN"
else
    echo "== building keibi (release)"
    (cd "$repo" && cargo build --release --workspace --bins)
    KEIBI_BIN="$repo/target/release"
fi

KEIBI_WORK="$(mktemp -d /var/tmp/keibi-sync-bench.XXXXXX)"
chmod 0755 "$KEIBI_WORK"
sshd_pid=""
ssh_mnt="$KEIBI_WORK/sshfs-mnt"
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if mountpoint -q "$ssh_mnt" 2>/dev/null; then
        fusermount3 -u "$ssh_mnt" 2>/dev/null || umount -l "$ssh_mnt" || true
    fi
    if [[ -n "$sshd_pid" ]]; then
        kill -TERM "$sshd_pid" 2>/dev/null || true
        wait "$sshd_pid" 2>/dev/null || true
    fi
    keibi_nodes_stop
    if [[ $rc -eq 0 ]]; then
        rm -rf "$KEIBI_WORK"
    else
        echo "sync.sh: failed; logs are in $KEIBI_WORK/{alice,bob}" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for n in alice bob; do
    keibi_node_up "$n"
done
keibi_pair alice bob
alice="$KEIBI_WORK/alice/mnt"
bob="$KEIBI_WORK/bob/mnt"
fp_alice="$(keibi_node_fingerprint alice)"

# bytes_received by bob from alice on the live connection.
bob_received() {
    keibi_node_ctl bob peer list --json | python3 -c '
import json, sys
print(next(p["bytes_received"] for p in json.load(sys.stdin) if p["fingerprint"] == sys.argv[1]))' "$fp_alice"
}

echo
echo "== propagation: close() on alice until stat on bob shows the size ($files files)"
mkdir "$alice/prop"
python3 - "$alice/prop" "$bob/prop" "$files" <<'PY'
import os, sys, time
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline_s = 30.0
# bob must see the directory first.
t0 = time.monotonic()
while not os.path.isdir(dst):
    if time.monotonic() - t0 > deadline_s:
        sys.exit("prop/ did not reach bob within 30 s")
    time.sleep(0.001)
lat = []
for i in range(n):
    name = f"f{i:05d}"
    size = 4096 + i
    data = os.urandom(size)
    fd = os.open(os.path.join(src, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.close(fd)
    t0 = time.monotonic()
    while True:
        try:
            if os.stat(os.path.join(dst, name)).st_size == size:
                break
        except FileNotFoundError:
            pass
        if time.monotonic() - t0 > deadline_s:
            sys.exit(f"{name} did not reach bob within 30 s")
        time.sleep(0.0002)
    lat.append((time.monotonic() - t0) * 1000.0)
lat.sort()
def pct(p):
    return lat[min(len(lat) - 1, int(round(p / 100.0 * len(lat) + 0.5)) - 1)]
print(f"propagation ms: p50 {pct(50):.1f}  p90 {pct(90):.1f}  p99 {pct(99):.1f}  max {lat[-1]:.1f}  (n={len(lat)})")
PY

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}
# dd's MB/s (10^6 bytes/s) for reading $1 sequentially.
read_mbps() {
    dd if="$1" of=/dev/null bs=1M 2>&1 | python3 -c '
import re, sys
t = sys.stdin.read()
m = re.search(r"(\d+) bytes .* copied, ([0-9.]+) s", t)
if not m:
    sys.exit("cannot parse dd: " + t)
print(f"{int(m.group(1)) / float(m.group(2)) / 1e6:.0f}")'
}

echo
echo "== cold sequential read of a $size_mib MiB file of alice through bob's mount"
head -c $((size_mib * 1024 * 1024)) /dev/urandom >"$KEIBI_WORK/big.src"
cp "$KEIBI_WORK/big.src" "$alice/big.bin"
size_is() { [[ "$(stat -c %s "$1" 2>/dev/null)" == "$2" ]]; }
if ! keibi_poll 60 size_is "$bob/big.bin" $((size_mib * 1024 * 1024)); then
    echo "sync.sh: big.bin did not reach bob within 60 s" >&2
    exit 1
fi
drop_caches
# CPU seconds (user + system) each daemon spends on the read: the cost per
# GiB, which unlike MB/s does not depend on what else the machine runs.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
cpu_pids=("${KEIBI_NODE_SYNCD_PID[alice]}" "${KEIBI_NODE_SYNCD_PID[bob]}" "${KEIBI_NODE_MOUNTD_PID[bob]}")
cpu_before=()
for p in "${cpu_pids[@]}"; do cpu_before+=("$(cpu_ticks "$p")"); done
# Context switches (voluntary and not) of all of a process's threads: each
# is a thread put to sleep or woken, which costs most on a VM.
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches:/ { n += $2 } END { print n + 0 }'; }
switches_before=()
for p in "${cpu_pids[@]}"; do switches_before+=("$(switches "$p")"); done
# The whole machine's busy and total ticks (every CPU, every process and
# kernel thread: page cache writeback, loopback softirqs, dd itself), and
# the ticks the hypervisor stole from this VM.
machine_ticks() { awk '/^cpu / {print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8+$9, $9}' /proc/stat; }
machine_before="$(machine_ticks)"
perf_pids=()
if [[ -n "$perf_dir" ]]; then
    mkdir -p "$perf_dir"
    perf_names=(alice-syncd bob-syncd bob-mountd)
    for i in 0 1 2; do
        perf record -q -F 999 -g -p "${cpu_pids[$i]}" -o "$perf_dir/${perf_names[$i]}.data" \
            >"$perf_dir/${perf_names[$i]}.log" 2>&1 &
        perf_pids+=($!)
    done
    # perf says nothing when it is attached; its data file appears then.
    for i in 0 1 2; do
        keibi_poll 10 test -s "$perf_dir/${perf_names[$i]}.data" || true
    done
fi
keibi_mbps="$(read_mbps "$bob/big.bin")"
if [[ ${#perf_pids[@]} -gt 0 ]]; then
    kill -INT "${perf_pids[@]}" 2>/dev/null || true
    wait "${perf_pids[@]}" 2>/dev/null || true
    echo "profiles of the cold read: $perf_dir/{alice-syncd,bob-syncd,bob-mountd}.data"
fi
machine_after="$(machine_ticks)"
cpu_after=()
for p in "${cpu_pids[@]}"; do cpu_after+=("$(cpu_ticks "$p")"); done
switches_after=()
for p in "${cpu_pids[@]}"; do switches_after+=("$(switches "$p")"); done
# shellcheck disable=SC2086 # machine_* are three numbers each
cpu_line="$(python3 - "$(getconf CLK_TCK)" "$size_mib" "${cpu_before[@]}" "${cpu_after[@]}" $machine_before $machine_after <<'PY'
import sys
hz, mib = int(sys.argv[1]), int(sys.argv[2])
b, a = list(map(int, sys.argv[3:6])), list(map(int, sys.argv[6:9]))
mb, mt, ms, ma, mu, mz = map(int, sys.argv[9:15])
gib = mib / 1024
per = [(y - x) / hz / gib for x, y in zip(b, a)]
busy = (ma - mb) / hz / gib
share = (ma - mb) / max(1, mu - mt)
print(f"CPU s per GiB read: alice's syncd {per[0]:.2f}, bob's syncd {per[1]:.2f}, bob's mountd {per[2]:.2f}, total {sum(per):.2f}; "
      f"whole machine {busy:.2f} ({share:.0%} of its CPUs busy, {(mz - ms) / max(1, mu - mt):.0%} stolen)")
PY
)"
echo "$cpu_line"
switch_line="$(python3 - "$size_mib" "${switches_before[@]}" "${switches_after[@]}" <<'PY'
import sys
chunks = int(sys.argv[1]) * 4  # 256 KiB chunks
b, a = list(map(int, sys.argv[2:5])), list(map(int, sys.argv[5:8]))
per = [(y - x) / chunks for x, y in zip(b, a)]
print(f"context switches per 256 KiB chunk: alice's syncd {per[0]:.1f}, bob's syncd {per[1]:.1f}, bob's mountd {per[2]:.1f}")
PY
)"
echo "$switch_line"
if ! cmp -s "$KEIBI_WORK/big.src" "$bob/big.bin"; then
    echo "sync.sh: big.bin read on bob differs from what alice wrote" >&2
    exit 1
fi
echo "keibi (bob reads alice's file): $keibi_mbps MB/s"

sshfs_mbps=""
if [[ $with_sshfs -eq 1 ]]; then
    echo "== the same read through sshfs from sshd on 127.0.0.1"
    ssh_dir="$KEIBI_WORK/ssh"
    mkdir -p "$ssh_dir" "$KEIBI_WORK/sshfs-src" "$ssh_mnt" /run/sshd
    ssh-keygen -q -t ed25519 -N '' -f "$ssh_dir/host_key"
    ssh-keygen -q -t ed25519 -N '' -f "$ssh_dir/client_key"
    cp "$ssh_dir/client_key.pub" "$ssh_dir/authorized_keys"
    port="$(keibi_free_port)"
    cat >"$ssh_dir/sshd_config" <<CONF
ListenAddress 127.0.0.1:$port
HostKey $ssh_dir/host_key
AuthorizedKeysFile $ssh_dir/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile $ssh_dir/sshd.pid
Subsystem sftp internal-sftp
CONF
    /usr/sbin/sshd -D -e -f "$ssh_dir/sshd_config" 2>"$KEIBI_WORK/sshd.log" &
    sshd_pid=$!
    mv "$KEIBI_WORK/big.src" "$KEIBI_WORK/sshfs-src/big.bin"
    ssh_up() {
        kill -0 "$sshd_pid" 2>/dev/null || return 2
        sshfs -p "$port" -o IdentityFile="$ssh_dir/client_key",StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes \
            "root@127.0.0.1:$KEIBI_WORK/sshfs-src" "$ssh_mnt" 2>/dev/null
    }
    if ! keibi_poll 15 ssh_up; then
        echo "sync.sh: sshd or sshfs did not start; see $KEIBI_WORK/sshd.log" >&2
        exit 1
    fi
    drop_caches
    sshfs_mbps="$(read_mbps "$ssh_mnt/big.bin")"
    echo "sshfs (127.0.0.1): $sshfs_mbps MB/s"
fi

echo
echo "== one 4 KiB edit in the middle of the $size_mib MiB file on alice"
before="$(bob_received)"
offset=$((size_mib * 1024 * 1024 / 2 + 1000))
head -c 4096 /dev/urandom >"$KEIBI_WORK/patch"
dd if="$KEIBI_WORK/patch" of="$alice/big.bin" bs=4096 count=1 seek="$offset" oflag=seek_bytes conv=notrunc status=none
patched() {
    cmp -s "$KEIBI_WORK/patch" <(dd if="$bob/big.bin" bs=4096 count=1 skip="$offset" iflag=skip_bytes status=none)
}
if ! keibi_poll 60 patched; then
    echo "sync.sh: the edit did not reach bob within 60 s" >&2
    exit 1
fi
after="$(bob_received)"
moved=$((after - before))
echo "bytes bob received from alice for the edit: $moved (file: $((size_mib * 1024 * 1024)) bytes, chunk: 262144)"

echo
echo "== summary"
echo "$cpu_line"
echo "$switch_line"
python3 - "$keibi_mbps" "${sshfs_mbps:-0}" "$moved" "$size_mib" <<'PY'
import sys
k, s, moved, mib = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(f"cold read through bob: {k:.0f} MB/s" + (f"; sshfs {s:.0f} MB/s; keibi/sshfs = {k / s:.2f}x" if s else ""))
print(f"one-chunk edit of a {mib} MiB file: {moved} bytes on the wire = {moved / 262144:.2f} chunks = {moved / (mib * 1048576) * 100:.4f}% of the file")
PY
