#!/usr/bin/env bash
# keibi per-operation benchmark: many small metadata operations on the keibi
# mount and on a plain directory of the filesystem that holds keibi's state
# directory (where keibi's content files live), printed as a table with
# keibi/native ratios.
#
# Run as root:   bash bench/ops.sh [options]
#
#   create   `touch` of --files new files in a fresh directory (one xargs
#            touch, so a few processes create them all)
#   stat     one `ls -l` of that directory (readdir with attributes, and a
#            stat per file)
#   lookup   `stat` of --files names that do not exist (one xargs stat):
#            each is one lookup answered by keibi-syncd, never cached
#   open     `cat *` of those (empty) files: an open and a release each
#   unlink   `rm -f *` of them
#
# Each figure is the median of --runs runs (default 3), in ms for the whole
# batch and in µs per file; the single runs are printed too. A run uses a
# new directory; the kernel's caches are not dropped (the figures are about
# the daemons, not the disk). On ext4 without a journal, creating files
# soon after many were deleted is slow and erratic (the inode allocator
# steps over every inode freed in the last minutes): the native create
# column then varies a lot from run to run, and so does keibi's, whose
# content files are created there too. Compare several runs.
#
# Options:
#   --runs N         runs per measurement (default 3)
#   --files N        files per run (default 2000)
#   --dir DIR        work directory (default: a new /var/tmp/keibi-ops.*;
#                    its filesystem is the "native" column)
#   --bin DIR        use the keibi binaries in DIR instead of building the
#                    release binaries (to compare two builds)
#   --no-native      measure only the keibi mount
#   --mountd-arg A   pass A to keibi-mountd (repeatable), e.g.
#                    --mountd-arg --no-passthrough
#
# keibi-syncd runs as `nobody` with RUST_LOG as given (default info), as in
# scripts/demo.sh; its log and mountd's are kept in the work directory when
# the script fails.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/packages.sh
. "$repo/scripts/lib/packages.sh"
# shellcheck source=scripts/lib/daemons.sh
. "$repo/scripts/lib/daemons.sh"

runs=3
files=2000
work_dir=""
bin_dir=""
native_too=1
mountd_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) runs="$2"; shift ;;
        --files) files="$2"; shift ;;
        --dir) work_dir="$2"; shift ;;
        --bin) bin_dir="$2"; shift ;;
        --no-native) native_too=0 ;;
        --mountd-arg) mountd_args+=("$2"); shift ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "ops.sh: unknown option $1 (see --help)" >&2
            exit 2
            ;;
    esac
    shift
done
for n in "$runs" "$files"; do
    if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "ops.sh: $n is not a positive number" >&2
        exit 2
    fi
done

require_root "it mounts a FUSE filesystem and runs keibi-syncd as nobody"
need_command fusermount3 fuse3
need_command findmnt util-linux
need_command setpriv util-linux
if [[ -z "$bin_dir" ]]; then
    find_cargo
    need_command cc gcc
fi
install_needed

if [[ -z "$bin_dir" ]]; then
    echo "== building keibi (release)"
    (cd "$repo" && cargo build --release --workspace --bins)
    KEIBI_BIN="$repo/target/release"
else
    KEIBI_BIN="$(cd "$bin_dir" && pwd)"
fi
for b in keibi-syncd keibi-mountd; do
    if [[ ! -x "$KEIBI_BIN/$b" ]]; then
        echo "ops.sh: $KEIBI_BIN/$b is missing" >&2
        exit 1
    fi
done

if [[ -z "$work_dir" ]]; then
    work_dir="$(mktemp -d /var/tmp/keibi-ops.XXXXXX)"
fi
keibi_setup_workdir "$work_dir"
native="$KEIBI_WORK/native"
mkdir -p "$native"

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    keibi_stop
    if [[ $rc -eq 0 ]]; then
        rm -rf "$KEIBI_WORK"
    else
        echo "ops.sh: failed; logs are in $KEIBI_WORK" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now_ns() { date +%s%N; }
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ms_since() { awk -v d=$(($(now_ns) - $1)) 'BEGIN { printf "%.1f\n", d / 1e6 }'; }

declare -A result
targets=()
rows=(create stat lookup open unlink)

# One run of every measurement in a new directory under $1; appends the
# times (ms) to the arrays named t_<row>.
one_run() {
    local d="$1/ops.$2" t0 n
    mkdir "$d"
    cd "$d"
    t0=$(now_ns)
    seq -f "f%05g" 1 "$files" | xargs touch
    t_create+=("$(ms_since "$t0")")
    t0=$(now_ns)
    # shellcheck disable=SC2012 # ls -l is what is measured
    n=$(ls -l | wc -l)
    t_stat+=("$(ms_since "$t0")")
    if ((n != files + 1)); then
        echo "ops.sh: ls -l in $d listed $((n - 1)) files, expected $files" >&2
        exit 1
    fi
    t0=$(now_ns)
    # Every stat fails (ENOENT), so xargs exits 123.
    seq -f "m%05g" 1 "$files" | xargs stat >/dev/null 2>&1 || true
    t_lookup+=("$(ms_since "$t0")")
    t0=$(now_ns)
    # shellcheck disable=SC2035 # every name is f<digits>
    cat * >/dev/null
    t_open+=("$(ms_since "$t0")")
    t0=$(now_ns)
    # shellcheck disable=SC2035
    rm -f *
    t_unlink+=("$(ms_since "$t0")")
    cd /
    if [[ -n "$(ls -A "$d")" ]]; then
        echo "ops.sh: $d is not empty after rm -f *" >&2
        exit 1
    fi
    rmdir "$d"
}

# Measure directory $2, recorded under the name $1.
measure() {
    local name="$1" dir="$2" i r
    targets+=("$name")
    echo "== $name: $dir"
    t_create=() t_stat=() t_lookup=() t_open=() t_unlink=()
    for ((i = 0; i < runs; i++)); do
        one_run "$dir" "$i"
    done
    for r in "${rows[@]}"; do
        local -n arr="t_$r"
        result[$name:$r]=$(printf '%s\n' "${arr[@]}" | median)
        echo "   $r: ${result[$name:$r]} ms (runs: ${arr[*]})"
        unset -n arr
    done
}

echo "== starting keibi-syncd as $KEIBI_SYNCD_USER (state: $KEIBI_STATE)"
keibi_start_syncd
echo "== starting keibi-mountd on $KEIBI_MNT ${mountd_args[*]}"
keibi_start_mountd "${mountd_args[@]}"
keibi_wait_mounted

if [[ $native_too -eq 1 ]]; then
    measure native "$native"
fi
measure keibi "$KEIBI_MNT"

state_fs="$(findmnt -n -o SOURCE,FSTYPE -T "$KEIBI_STATE" | tr -s ' ')"
echo
echo "keibi $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?'), binaries $KEIBI_BIN," \
    "$(uname -r), $(nproc) CPUs; $files files, median of $runs runs"
[[ $native_too -eq 1 ]] && echo "native = a directory on the state directory's filesystem ($state_fs)"
echo
declare -A label=(
    [create]="create (xargs touch)"
    [stat]="stat (one ls -l)"
    [lookup]="lookup (stat missing)"
    [open]="open+release (cat *)"
    [unlink]="unlink (rm -f *)"
)
header=$(printf '%-24s' "$files files")
for t in "${targets[@]}"; do
    header+=$(printf ' %10s %9s' "$t ms" "µs/file")
    [[ "$t" != native ]] && [[ $native_too -eq 1 ]] && header+=$(printf ' %7s' "ratio")
done
echo "$header"
for r in "${rows[@]}"; do
    line=$(printf '%-24s' "${label[$r]}")
    for t in "${targets[@]}"; do
        line+=$(awk -v a="${result[$t:$r]}" -v n="$files" 'BEGIN { printf " %10.1f %9.1f", a, a * 1000 / n }')
        if [[ "$t" != native ]] && [[ $native_too -eq 1 ]]; then
            line+=$(awk -v a="${result[$t:$r]}" -v b="${result[native:$r]}" 'BEGIN { if (b > 0) printf " %7.1f", a / b; else printf " %7s", "-" }')
        fi
    done
    echo "$line"
done
[[ $native_too -eq 1 ]] && echo && echo "ratio = keibi / native (lower is better)"
exit 0
