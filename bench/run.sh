#!/usr/bin/env bash
# keibi benchmark: the workloads of a "local disk" on keibi and on four
# other file systems, in the same run, several times, interleaved.
#
# Run as root:   bash bench/run.sh [options]
#
# Systems (each gets the same workloads, in this order, in every run):
#   native   a directory on the filesystem of keibi's state directory
#            (where keibi's content files live)
#   keibi    a keibi mount (keibi-syncd as `nobody`, keibi-mountd as root,
#            as scripts/demo.sh starts them)
#   bindfs   a bindfs mirror of a directory of that filesystem (a plain
#            FUSE file system)
#   sshfs    sshfs over an sshd of its own on 127.0.0.1 (own port, host key
#            and user key in the work directory; the system's sshd and ssh
#            configuration are not used)
#   rclone   `rclone mount --vfs-cache-mode full` of an sftp remote on that
#            sshd (the remote is defined by environment variables, no rclone
#            configuration file is read or written); after each of its
#            workloads run.sh waits (untimed) until rclone has uploaded what
#            was written: its figures leave out these background uploads
#
# Workloads (bench/workloads.py; seconds unless said):
#   create    --files files of 100 bytes (python: open, write, close)
#   ls -l     one `ls -l` of them
#   stat      lstat of each
#   read      open, read, close of each
#   rm -rf    of them
#   extract   `tar -xf` of a source tarball of 581 files: the tokio crate of
#             Cargo.lock from cargo's download cache (uncompressed first, so
#             gzip is not timed); the same bytes on every machine
#   git       `git init`, 200 files written, `git add -A`, `git commit`,
#             `git status`
#   seq write --size-mib MiB (default 1024) written and fsynced; MB/s
#   seq read  the same file, read after dropping the kernel's caches; MB/s
#   fio       random 4 KiB reads (fio, psync, one job) of a 256 MiB file
#             for 10 s, starting with the kernel's caches dropped; IOPS
#
# Two-machine workloads: bench/sync.sh (two keibi peers on this machine:
# propagation p50/p90/p99 and the cold read of a remote file against
# sshfs) runs after the others unless --no-sync; its figures are parsed
# into the same report.
#
# It prints a table of medians (with min-max) and each system's ratio to
# native, and keibi's ratio to each other system; writes every sample,
# the medians and all pairwise ratios as JSON; draws the chart
# (bench/chart, a small plotters program outside the workspace) and writes
# docs/benchmarks.md with the machine, the date, the tables and the chart
# (docs/benchmarks.svg).
#
# Options:
#   --runs N          runs of every workload on every system (default 3)
#   --quick           a smoke run: 1,000 files, 64 MiB, fio 3 s on 32 MiB,
#                     a smaller sync run (--runs stays as given)
#   --files N         files for create/ls/stat/read/rm (default 10000)
#   --size-mib N      size of the sequential file (default 1024)
#   --systems LIST    comma-separated subset of native,keibi,bindfs,sshfs,
#                     rclone (native is always measured)
#   --no-passthrough  also measure keibi-mountd --no-passthrough, as the
#                     system keibi-nopt (a second mount of the same syncd)
#   --scale           also ls -l at 1,000 / 10,000 / 100,000 entries on
#                     native and keibi (--quick: 100 / 1,000 / 10,000), and
#                     keibi-syncd's and keibi-mountd's RSS after each
#   --no-sync         skip bench/sync.sh
#   --json PATH       where the JSON goes (default bench/results/latest.json)
#   --doc PATH        where the report goes (default docs/benchmarks.md; the
#                     chart is written beside it with the extension .svg);
#                     --no-doc writes neither
#   --note TEXT       a sentence about the conditions, put in the report
#   --bin DIR         use the keibi binaries in DIR instead of building the
#                     release binaries (to compare two builds)
#   --dir DIR         work directory (default: a new /var/tmp/keibi-bench.*;
#                     its filesystem is the native column)
#
# Each workload is bounded (15 minutes; a scale step 30 minutes) and a
# failed or timed-out one is reported as failed, not dropped.
#
# Installs what is missing with apt-get (fuse3, util-linux, python3, gcc,
# git, tar, bindfs, sshfs, openssh-server, openssh-client, rclone, fio);
# Rust (cargo 1.95+) must already be installed. Stops and removes
# everything it started (mounts, sshd, rclone, keibi daemons, the work
# directory) on success, on failure and on Ctrl-C; on failure the logs are
# kept and their directory is printed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/packages.sh
. "$repo/scripts/lib/packages.sh"
# shellcheck source=scripts/lib/daemons.sh
. "$repo/scripts/lib/daemons.sh"

orig_args="$*"
runs=3
quick=0
files=""
size_mib=""
systems_arg="native,keibi,bindfs,sshfs,rclone"
no_passthrough=0
scale=0
do_sync=1
json_out="$repo/bench/results/latest.json"
doc_out="$repo/docs/benchmarks.md"
write_doc=1
note=""
work_dir=""
bin_dir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) runs="$2"; shift ;;
        --quick) quick=1 ;;
        --files) files="$2"; shift ;;
        --size-mib) size_mib="$2"; shift ;;
        --systems) systems_arg="$2"; shift ;;
        --no-passthrough) no_passthrough=1 ;;
        --scale) scale=1 ;;
        --no-sync) do_sync=0 ;;
        --json) json_out="$2"; shift ;;
        --doc) doc_out="$2"; shift ;;
        --no-doc) write_doc=0 ;;
        --note) note="$2"; shift ;;
        --dir) work_dir="$2"; shift ;;
        --bin) bin_dir="$2"; shift ;;
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
if [[ $quick -eq 1 ]]; then
    : "${files:=1000}" "${size_mib:=64}"
    fio_size_mib=32 fio_seconds=3
    scale_sizes=(100 1000 10000)
    sync_args=(--files 50 --size-mib 64)
else
    : "${files:=10000}" "${size_mib:=1024}"
    fio_size_mib=256 fio_seconds=10
    scale_sizes=(1000 10000 100000)
    sync_args=()
fi
for n in "$runs" "$files" "$size_mib"; do
    if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "run.sh: $n is not a positive number" >&2
        exit 2
    fi
done
systems=(native)
IFS=, read -r -a wanted <<<"$systems_arg"
for s in "${wanted[@]}"; do
    case "$s" in
        native) ;;
        keibi | bindfs | sshfs | rclone) systems+=("$s") ;;
        *)
            echo "run.sh: unknown system $s (native, keibi, bindfs, sshfs, rclone)" >&2
            exit 2
            ;;
    esac
done
has() {
    local s
    for s in "${systems[@]}"; do [[ "$s" == "$1" ]] && return 0; done
    return 1
}
if [[ $no_passthrough -eq 1 ]]; then
    has keibi || systems+=(keibi)
    systems+=(keibi-nopt)
fi
if [[ $scale -eq 1 ]] && ! has keibi; then
    echo "run.sh: --scale measures keibi; keep keibi in --systems" >&2
    exit 2
fi

require_root "it mounts FUSE filesystems, drops the kernel's caches and runs keibi-syncd as nobody"
find_cargo
need_command fusermount3 fuse3
need_command findmnt util-linux
need_command setpriv util-linux
need_command timeout coreutils
need_command python3 python3
need_command cc gcc
need_command git git
need_command tar tar
need_command fio fio
has bindfs && need_command bindfs bindfs
if has sshfs || has rclone; then
    need_command ssh-keygen openssh-client
    [[ -x /usr/sbin/sshd ]] || need_package openssh-server
fi
has sshfs && need_command sshfs sshfs
has rclone && need_command rclone rclone
install_needed
if [[ ! -c /dev/fuse ]]; then
    modprobe fuse 2>/dev/null || true
fi
if [[ ! -c /dev/fuse ]]; then
    echo "run.sh: /dev/fuse is missing (a container without FUSE? start it with --device /dev/fuse --cap-add SYS_ADMIN)" >&2
    exit 1
fi

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
if [[ -z "$bin_dir" ]]; then
    echo "== building keibi (release)"
    (cd "$repo" && cargo build --release --workspace --bins)
    KEIBI_BIN="$repo/target/release"
else
    KEIBI_BIN="$(cd "$bin_dir" && pwd)"
fi
if has keibi; then
    for b in keibi-syncd keibi-mountd keibictl; do
        if [[ ! -x "$KEIBI_BIN/$b" ]]; then
            echo "run.sh: $KEIBI_BIN/$b is missing" >&2
            exit 1
        fi
    done
fi
if [[ $write_doc -eq 1 ]]; then
    echo "== building the chart program (bench/chart)"
    cargo build --release --manifest-path "$repo/bench/chart/Cargo.toml" --target-dir "$repo/target/bench-chart"
fi

# The tarball: the tokio crate that Cargo.lock names, from cargo's cache
# (the build above has downloaded it).
tokio_ver="$(awk '/^name = "tokio"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' "$repo/Cargo.lock")"
crate="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/cache" -name "tokio-$tokio_ver.crate" 2>/dev/null | head -n 1)"
if [[ -z "$crate" ]]; then
    echo "run.sh: tokio-$tokio_ver.crate is not in cargo's cache (${CARGO_HOME:-$HOME/.cargo}/registry/cache); run cargo fetch" >&2
    exit 1
fi

if [[ -z "$work_dir" ]]; then
    work_dir="$(mktemp -d /var/tmp/keibi-bench.XXXXXX)"
fi
keibi_setup_workdir "$work_dir"
W="$KEIBI_WORK"
tarball="$W/tokio-$tokio_ver.tar"
gzip -dc "$crate" >"$tarball"
tar_files="$(tar -tf "$tarball" | grep -vc '/$')"

declare -A dir_of=([native]="$W/native")
mkdir -p "$W/native"
sshd_pid=""
rclone_pid=""
nopt_pid=""
fuse_mounts=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    local m
    for m in "${fuse_mounts[@]}"; do
        if mountpoint -q "$m" 2>/dev/null; then
            fusermount3 -u "$m" 2>/dev/null || umount -l "$m"
        fi
    done
    for p in "$rclone_pid" "$sshd_pid" "$nopt_pid"; do
        [[ -n "$p" ]] && _keibi_term "$p" 10
    done
    if [[ -n "$nopt_pid" ]] && mountpoint -q "$W/mnt-nopt" 2>/dev/null; then
        umount -l "$W/mnt-nopt"
    fi
    keibi_stop
    if [[ $rc -eq 0 ]]; then
        rm -rf "$W"
    else
        echo "run.sh: failed or interrupted; logs are in $W" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- starting the systems -------------------------------------------------

mounted_as() { [[ "$(findmnt -n -o FSTYPE --mountpoint "$1" 2>/dev/null)" == "$2" ]]; }
alive_and_mounted() {
    kill -0 "$1" 2>/dev/null || return 2
    mounted_as "$2" "$3"
}

if has keibi; then
    echo "== starting keibi (state: $KEIBI_STATE)"
    keibi_start_syncd
    keibi_start_mountd
    keibi_wait_mounted
    dir_of[keibi]="$KEIBI_MNT"
fi
if has keibi-nopt; then
    mkdir -p "$W/mnt-nopt"
    setsid "$KEIBI_BIN/keibi-mountd" "$W/mnt-nopt" --syncd-socket "$KEIBI_FS_SOCK" \
        --lock-dir "$W/locks-nopt" --no-passthrough </dev/null >>"$W/mountd-nopt.log" 2>&1 &
    nopt_pid=$!
    if ! keibi_poll 20 alive_and_mounted "$nopt_pid" "$W/mnt-nopt" fuse.keibi; then
        echo "run.sh: keibi-mountd --no-passthrough did not mount; see $W/mountd-nopt.log" >&2
        exit 1
    fi
    mkdir "$W/mnt-nopt/nopt"
    dir_of[keibi-nopt]="$W/mnt-nopt/nopt"
fi
if has bindfs; then
    echo "== starting bindfs"
    mkdir -p "$W/bindfs-src" "$W/bindfs-mnt"
    fuse_mounts+=("$W/bindfs-mnt")
    bindfs "$W/bindfs-src" "$W/bindfs-mnt"
    dir_of[bindfs]="$W/bindfs-mnt"
fi
if has sshfs || has rclone; then
    echo "== starting sshd on 127.0.0.1"
    ssh_dir="$W/ssh"
    mkdir -p "$ssh_dir" /run/sshd
    ssh-keygen -q -t ed25519 -N '' -f "$ssh_dir/host_key"
    ssh-keygen -q -t ed25519 -N '' -f "$ssh_dir/client_key"
    cp "$ssh_dir/client_key.pub" "$ssh_dir/authorized_keys"
    ssh_port="$(keibi_free_port)"
    cat >"$ssh_dir/sshd_config" <<CONF
ListenAddress 127.0.0.1:$ssh_port
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
    /usr/sbin/sshd -D -e -f "$ssh_dir/sshd_config" 2>"$W/sshd.log" &
    sshd_pid=$!
fi
if has sshfs; then
    echo "== starting sshfs"
    mkdir -p "$W/sshfs-src" "$W/sshfs-mnt"
    fuse_mounts+=("$W/sshfs-mnt")
    ssh_up() {
        kill -0 "$sshd_pid" 2>/dev/null || return 2
        sshfs -p "$ssh_port" -o IdentityFile="$ssh_dir/client_key",StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes \
            "root@127.0.0.1:$W/sshfs-src" "$W/sshfs-mnt" 2>>"$W/sshfs.log"
    }
    if ! keibi_poll 15 ssh_up; then
        echo "run.sh: sshfs did not mount; see $W/sshd.log and $W/sshfs.log" >&2
        exit 1
    fi
    dir_of[sshfs]="$W/sshfs-mnt"
fi
if has rclone; then
    echo "== starting rclone mount (sftp to 127.0.0.1:$ssh_port, --vfs-cache-mode full)"
    mkdir -p "$W/rclone-src" "$W/rclone-mnt" "$W/rclone-cache"
    rc_port="$(keibi_free_port)"
    # The remote "kbsftp" exists only in these variables; --config names a
    # file of the work directory, so no rclone.conf is read or written.
    # No hash check (it runs md5sum over ssh for every uploaded file) and 8
    # uploads at once: otherwise uploading 10,000 small files takes most of
    # an hour on a 2-CPU machine.
    export RCLONE_CONFIG_KBSFTP_TYPE=sftp RCLONE_CONFIG_KBSFTP_HOST=127.0.0.1 \
        RCLONE_CONFIG_KBSFTP_PORT="$ssh_port" RCLONE_CONFIG_KBSFTP_USER=root \
        RCLONE_CONFIG_KBSFTP_KEY_FILE="$ssh_dir/client_key" RCLONE_CONFIG_KBSFTP_SHELL_TYPE=unix \
        RCLONE_CONFIG_KBSFTP_DISABLE_HASHCHECK=true
    rclone_common=(--config "$W/rclone.conf")
    fuse_mounts+=("$W/rclone-mnt")
    setsid rclone mount "${rclone_common[@]}" "kbsftp:$W/rclone-src" "$W/rclone-mnt" \
        --vfs-cache-mode full --cache-dir "$W/rclone-cache" --transfers 8 \
        --rc --rc-addr "127.0.0.1:$rc_port" --rc-no-auth \
        --log-file "$W/rclone.log" --log-level NOTICE </dev/null &
    rclone_pid=$!
    if ! keibi_poll 30 alive_and_mounted "$rclone_pid" "$W/rclone-mnt" fuse.rclone; then
        echo "run.sh: rclone did not mount; see $W/rclone.log" >&2
        exit 1
    fi
    dir_of[rclone]="$W/rclone-mnt"
fi

# Zero once rclone has no upload queued or running.
rclone_idle() {
    kill -0 "$rclone_pid" 2>/dev/null || return 2
    rclone rc "${rclone_common[@]}" --url "http://127.0.0.1:$rc_port/" vfs/stats 2>/dev/null | python3 -c '
import json, sys
c = json.load(sys.stdin)["diskCache"]
sys.exit(0 if c["uploadsInProgress"] == 0 and c["uploadsQueued"] == 0 else 1)'
}

# ---- the workloads ----------------------------------------------------------

samples="$W/samples.jsonl"
: >"$samples"
workloads=(create ls stat read rm extract git seqwrite seqread fio)

# One workload on one system; appends a sample (or the failure) to $samples.
one() {
    local run="$1" sys="$2" wl="$3" out err
    err="$W/last-error"
    if out="$(timeout --foreground -k 10 900 python3 "$repo/bench/workloads.py" "$wl" "${dir_of[$sys]}" \
        --files "$files" --tarball "$tarball" --size-mib "$size_mib" \
        --fio-size-mib "$fio_size_mib" --fio-seconds "$fio_seconds" 2>"$err")"; then
        python3 -c 'import json, sys; d = json.loads(sys.argv[4]); d.update(run=int(sys.argv[1]), system=sys.argv[2]); print(json.dumps(d))' \
            "$run" "$sys" "$wl" "$out" >>"$samples"
        printf ' %s' "$wl"
    else
        python3 -c 'import json, sys; print(json.dumps({"run": int(sys.argv[1]), "system": sys.argv[2], "workload": sys.argv[3], "error": sys.argv[4][-400:] or "failed"}))' \
            "$run" "$sys" "$wl" "$(cat "$err")" >>"$samples"
        printf ' %s(FAILED)' "$wl"
        # Leave nothing behind for the next workload.
        find "${dir_of[$sys]}" -mindepth 1 -delete 2>/dev/null || true
    fi
}

# Untimed, between two workloads: rclone uploads what was written after
# close (write-back); the next workload is timed once it is done, so that
# neither rclone's own next workload nor another system's runs beside its
# uploads (with uploads queued, `rm -rf` of 1,000 files took minutes).
settle() {
    if [[ "$1" == rclone ]] && ! keibi_poll 600 rclone_idle; then
        echo "run.sh: rclone still uploading after 600 s; see $W/rclone.log" >&2
        exit 1
    fi
}

for ((run = 1; run <= runs; run++)); do
    for sys in "${systems[@]}"; do
        printf '== run %d/%d, %s:' "$run" "$runs" "$sys"
        for wl in "${workloads[@]}"; do
            one "$run" "$sys" "$wl"
            settle "$sys"
            if [[ "$wl" == extract || "$wl" == git ]]; then
                timeout --foreground -k 10 900 python3 "$repo/bench/workloads.py" clean "${dir_of[$sys]}" >/dev/null
                settle "$sys"
            fi
        done
        echo
    done
done

# ---- scale: ls -l of larger directories, and the daemons' memory ---------

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
if [[ $scale -eq 1 ]]; then
    for n in "${scale_sizes[@]}"; do
        for sys in native keibi; do
            d="${dir_of[$sys]}/scale"
            mkdir -p "$d"
            printf '== scale %d files, %s:' "$n" "$sys"
            for wl in create ls rm; do
                if out="$(timeout --foreground -k 10 1800 python3 "$repo/bench/workloads.py" "$wl" "$d" --files "$n" 2>"$W/last-error")"; then
                    python3 -c 'import json, sys; d = json.loads(sys.argv[3]); d.update(system=sys.argv[1], workload="scale_" + d["workload"], entries=int(sys.argv[2])); print(json.dumps(d))' \
                        "$sys" "$n" "$out" >>"$samples"
                    printf ' %s' "$wl"
                else
                    python3 -c 'import json, sys; print(json.dumps({"system": sys.argv[1], "workload": "scale_" + sys.argv[3], "entries": int(sys.argv[2]), "error": sys.argv[4][-400:] or "failed"}))' \
                        "$sys" "$n" "$wl" "$(cat "$W/last-error")" >>"$samples"
                    printf ' %s(FAILED)' "$wl"
                fi
                # The daemons' memory right after ls -l has seen every entry.
                if [[ "$sys" == keibi && "$wl" == ls ]]; then
                    printf '{"system": "keibi", "workload": "scale_rss", "entries": %d, "syncd_kib": %d, "mountd_kib": %d}\n' \
                        "$n" "$(rss_kib "$KEIBI_SYNCD_PID")" "$(rss_kib "$KEIBI_MOUNTD_PID")" >>"$samples"
                fi
            done
            rm -rf "$d"
            echo
        done
    done
fi

# ---- two machines: bench/sync.sh -------------------------------------------

sync_log=""
if [[ $do_sync -eq 1 ]]; then
    echo "== two peers: bash bench/sync.sh ${sync_args[*]}"
    sync_log="$W/sync.log"
    if ! bash "$repo/bench/sync.sh" "${sync_args[@]}" 2>&1 | tee "$sync_log"; then
        echo "run.sh: bench/sync.sh failed; its output is in $sync_log" >&2
        exit 1
    fi
fi

# ---- the report ---------------------------------------------------------------

state_fs="$(findmnt -n -o SOURCE,FSTYPE,OPTIONS -T "$KEIBI_STATE" | tr -s ' ')"
versions="$(
    {
        echo "bindfs: $(bindfs --version 2>/dev/null | head -n 1)"
        echo "sshfs: $(sshfs --version 2>&1 | grep -i '^sshfs version' | head -n 1)"
        echo "OpenSSH: $(ssh -V 2>&1)"
        echo "rclone: $(rclone version 2>/dev/null | head -n 1)"
        echo "fio: $(fio --version 2>/dev/null)"
        echo "git: $(git --version)"
        echo "python: $(python3 --version 2>&1)"
    } | tr '\n' ';'
)"
# Whether the keibi mount used FUSE passthrough (the kernel may refuse it).
keibi_pt="-"
if has keibi; then
    keibi_pt="$("$KEIBI_BIN/keibictl" --socket "$KEIBI_CONTROL_SOCK" status --json | python3 -c '
import json, sys
def walk(v):
    if isinstance(v, dict):
        if v.get("mountpoint") == sys.argv[1] and "passthrough" in v:
            yield v["passthrough"]
        for x in v.values():
            yield from walk(x)
    elif isinstance(v, list):
        for x in v:
            yield from walk(x)
print(next(("yes" if p else "no" for p in walk(json.load(sys.stdin))), "unknown"))' "$KEIBI_MNT" || echo unknown)"
fi
mkdir -p "$(dirname "$json_out")"
report_args=(
    --samples "$samples" --json "$json_out" --systems "${systems[*]}" --runs "$runs"
    --files "$files" --size-mib "$size_mib" --fio-size-mib "$fio_size_mib" --fio-seconds "$fio_seconds"
    --tarball-name "tokio-$tokio_ver.crate" --tarball-files "$tar_files"
    --state-fs "$state_fs" --keibi-passthrough "$keibi_pt" --load-before "$load_before" --versions "$versions"
    --commit "$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')"
    --command "bash bench/run.sh${orig_args:+ $orig_args}" --note "$note"
)
[[ -n "$sync_log" ]] && report_args+=(--sync-log "$sync_log")
[[ $quick -eq 1 ]] && report_args+=(--quick)
if [[ $write_doc -eq 1 ]]; then
    report_args+=(--doc "$doc_out" --chart "${doc_out%.md}.svg" --chart-bin "$repo/target/bench-chart/release/keibi-bench-chart")
fi
python3 "$repo/bench/report.py" "${report_args[@]}"
exit 0
