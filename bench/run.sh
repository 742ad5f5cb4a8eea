#!/usr/bin/env bash
# keibi benchmark: the same measurements on the keibi mount and on a plain
# directory of the filesystem that holds keibi's state directory (where
# keibi's content files live), printed as a table with keibi/native ratios.
#
# Run as root:   bash bench/run.sh [options]
#
#   ls -l        of a directory of --files files (default 10,000), cold
#                (after dropping the kernel's caches) and warm; time in ms
#   write        --size-mib MiB (default 1024) with dd bs=1M conv=fsync; MB/s
#   read cold    the same file after `echo 3 > /proc/sys/vm/drop_caches`; MB/s
#   read warm    the same file again; MB/s
#
# Each figure is the median of --runs runs (default 3). MB/s is 10^6 bytes
# per second, as dd prints it.
#
# Options:
#   --runs N            runs per measurement (default 3)
#   --files N           files in the ls -l directory (default 10000)
#   --size-mib N        size of the sequential file (default 1024)
#   --dir DIR           work directory (default: a new /var/tmp/keibi-bench.*;
#                       its filesystem is the "native" column)
#   --no-passthrough    also measure a mount without FUSE passthrough
#                       (keibi-mountd --no-passthrough)
#   --with-sshfs        install openssh-server and sshfs when missing and add
#                       sshfs over loopback as a baseline (it is measured
#                       without this flag too when both are installed)
#
# Builds the release binaries first (cargo must be installed). keibi-syncd
# runs as `nobody`, as in scripts/demo.sh.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/packages.sh
. "$repo/scripts/lib/packages.sh"
# shellcheck source=scripts/lib/daemons.sh
. "$repo/scripts/lib/daemons.sh"

runs=3
files=10000
size_mib=1024
work_dir=""
no_passthrough=0
with_sshfs=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) runs="$2"; shift ;;
        --files) files="$2"; shift ;;
        --size-mib) size_mib="$2"; shift ;;
        --dir) work_dir="$2"; shift ;;
        --no-passthrough) no_passthrough=1 ;;
        --with-sshfs) with_sshfs=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "run.sh: unknown option $1 (see --help)" >&2
            exit 2
            ;;
    esac
    shift
done
for n in "$runs" "$files" "$size_mib"; do
    if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "run.sh: $n is not a positive number" >&2
        exit 2
    fi
done

require_root "it mounts FUSE filesystems and drops the kernel's caches"
find_cargo
need_command fusermount3 fuse3
need_command findmnt util-linux
need_command setpriv util-linux
need_command python3 python3
need_command cc gcc
if [[ $with_sshfs -eq 1 ]]; then
    need_command sshfs sshfs
    [[ -x /usr/sbin/sshd ]] || need_package openssh-server
fi
install_needed

echo "== building keibi (release)"
(cd "$repo" && cargo build --release --workspace --bins)
KEIBI_BIN="$repo/target/release"

if [[ -z "$work_dir" ]]; then
    work_dir="$(mktemp -d /var/tmp/keibi-bench.XXXXXX)"
fi
keibi_setup_workdir "$work_dir"
native="$KEIBI_WORK/native"
mkdir -p "$native"

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
    keibi_stop
    if [[ $rc -eq 0 ]]; then
        rm -rf "$KEIBI_WORK"
    else
        echo "run.sh: failed; logs are in $KEIBI_WORK" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now_ns() { date +%s%N; }
drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# ms for one `ls -l` of $1
time_ls() {
    local t0 t1
    t0=$(now_ns)
    ls -l "$1" >/dev/null
    t1=$(now_ns)
    awk -v d=$((t1 - t0)) 'BEGIN { printf "%.1f\n", d / 1e6 }'
}

# MB/s of moving $size_mib MiB in $(( t1 - t0 )) ns
mbps() { awk -v b=$((size_mib * 1048576)) -v d="$1" 'BEGIN { printf "%.0f\n", b / (d / 1e9) / 1e6 }'; }

write_mbps() {
    local t0 t1
    rm -f "$1"
    t0=$(now_ns)
    dd if=/dev/zero of="$1" bs=1M count="$size_mib" conv=fsync status=none
    t1=$(now_ns)
    mbps $((t1 - t0))
}

read_mbps() {
    local t0 t1
    t0=$(now_ns)
    dd if="$1" of=/dev/null bs=1M status=none
    t1=$(now_ns)
    mbps $((t1 - t0))
}

declare -A result
targets=()

# Measure everything on directory $2, recorded under the name $1.
measure() {
    local name="$1" dir="$2" i
    targets+=("$name")
    echo "== $name: $dir"
    mkdir -p "$dir/many"
    (cd "$dir/many" && seq -f "f%05g" 1 "$files" | xargs touch)
    local ls_cold=() ls_warm=() w=() rc=() rw=()
    for ((i = 0; i < runs; i++)); do
        drop_caches
        ls_cold+=("$(time_ls "$dir/many")")
        ls_warm+=("$(time_ls "$dir/many")")
    done
    for ((i = 0; i < runs; i++)); do
        w+=("$(write_mbps "$dir/big")")
        drop_caches
        rc+=("$(read_mbps "$dir/big")")
        rw+=("$(read_mbps "$dir/big")")
    done
    rm -f "$dir/big"
    rm -rf "$dir/many"
    result[$name:ls_cold]=$(printf '%s\n' "${ls_cold[@]}" | median)
    result[$name:ls_warm]=$(printf '%s\n' "${ls_warm[@]}" | median)
    result[$name:write]=$(printf '%s\n' "${w[@]}" | median)
    result[$name:read_cold]=$(printf '%s\n' "${rc[@]}" | median)
    result[$name:read_warm]=$(printf '%s\n' "${rw[@]}" | median)
    echo "   ls -l cold ${result[$name:ls_cold]} ms, warm ${result[$name:ls_warm]} ms;" \
        "write ${result[$name:write]} MB/s, read cold ${result[$name:read_cold]} MB/s, warm ${result[$name:read_warm]} MB/s"
}

start_keibi() {
    keibi_start_mountd "$@"
    keibi_wait_mounted
}

keibi_start_syncd
start_keibi

measure native "$native"
measure keibi "$KEIBI_MNT"

if [[ $no_passthrough -eq 1 ]]; then
    _keibi_term "$KEIBI_MOUNTD_PID" 10
    if keibi_is_mounted; then
        echo "run.sh: the mount stayed after keibi-mountd stopped" >&2
        exit 1
    fi
    start_keibi --no-passthrough
    measure keibi-no-passthrough "$KEIBI_MNT"
fi

sshfs_note=""
if command -v sshfs >/dev/null 2>&1 && [[ -x /usr/sbin/sshd ]] && command -v ssh-keygen >/dev/null 2>&1; then
    echo "== starting sshd on 127.0.0.1 for the sshfs baseline"
    ssh_dir="$KEIBI_WORK/ssh"
    mkdir -p "$ssh_dir" "$KEIBI_WORK/sshfs-src" "$ssh_mnt" /run/sshd
    ssh-keygen -q -t ed25519 -N '' -f "$ssh_dir/host_key"
    ssh-keygen -q -t ed25519 -N '' -f "$ssh_dir/client_key"
    cp "$ssh_dir/client_key.pub" "$ssh_dir/authorized_keys"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 22022)
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
    ssh_up() {
        kill -0 "$sshd_pid" 2>/dev/null || return 2
        sshfs -p "$port" -o IdentityFile="$ssh_dir/client_key",StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes \
            "root@127.0.0.1:$KEIBI_WORK/sshfs-src" "$ssh_mnt" 2>/dev/null
    }
    if keibi_poll 15 ssh_up; then
        measure sshfs "$ssh_mnt"
    else
        sshfs_note="sshfs baseline: skipped (sshd or sshfs failed to start; see $KEIBI_WORK/sshd.log)"
    fi
else
    sshfs_note="sshfs baseline: skipped (sshfs and openssh-server are not both installed; --with-sshfs installs them)"
fi

# The table.
state_fs="$(findmnt -n -o SOURCE,FSTYPE -T "$KEIBI_STATE" | tr -s ' ')"
echo
echo "keibi $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?'), $(uname -r), $(nproc) CPUs;" \
    "$files files, ${size_mib} MiB file, median of $runs runs"
echo "native = a directory on the state directory's filesystem ($state_fs)"
echo
rows=(ls_cold ls_warm write read_cold read_warm)
declare -A label=(
    [ls_cold]="ls -l $files files, cold (ms)"
    [ls_warm]="ls -l $files files, warm (ms)"
    [write]="write+fsync (MB/s)"
    [read_cold]="read, cold cache (MB/s)"
    [read_warm]="read, warm cache (MB/s)"
)
# Each column is as wide as its name, at least 10.
declare -A width
header=$(printf '%-32s' "measurement")
for t in "${targets[@]}"; do
    width[$t]=$((${#t} > 10 ? ${#t} : 10))
    header+=$(printf ' %*s' "${width[$t]}" "$t")
    [[ "$t" != native ]] && header+=$(printf ' %8s' "ratio")
done
echo "$header"
for r in "${rows[@]}"; do
    line=$(printf '%-32s' "${label[$r]}")
    for t in "${targets[@]}"; do
        line+=$(printf ' %*s' "${width[$t]}" "${result[$t:$r]}")
        if [[ "$t" != native ]]; then
            line+=$(awk -v a="${result[$t:$r]}" -v b="${result[native:$r]}" 'BEGIN { if (b > 0) printf " %8.2f", a / b; else printf " %8s", "-" }')
        fi
    done
    echo "$line"
done
echo
echo "ratio = that column / native (for ms lower is better, for MB/s higher is better)"

# The same as a Markdown table, for the README.
echo
md="| measurement |"
sep="|---|"
for t in "${targets[@]}"; do
    md+=" $t |"
    sep+="---|"
    [[ "$t" != native ]] && md+=" ratio |" && sep+="---|"
done
echo "$md"
echo "$sep"
for r in "${rows[@]}"; do
    line="| ${label[$r]} |"
    for t in "${targets[@]}"; do
        line+=" ${result[$t:$r]} |"
        if [[ "$t" != native ]]; then
            line+=$(awk -v a="${result[$t:$r]}" -v b="${result[native:$r]}" 'BEGIN { if (b > 0) printf " %.2f |", a / b; else printf " - |" }')
        fi
    done
    echo "$line"
done
[[ -n "$sshfs_note" ]] && echo "$sshfs_note"
exit 0
