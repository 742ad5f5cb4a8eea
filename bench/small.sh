#!/usr/bin/env bash
# keibi small-file workloads of issue 8, native against keibi, interleaved:
# each round runs every workload once on the native directory and once on
# the keibi mount, alternating which goes first, so a noisy neighbour hits
# both. Prints the median and the spread (min..max) of each, in seconds,
# and the keibi/native ratio of the medians.
#
# Run as root:   bash bench/small.sh [options]
#
#   create   python: 10,000 files of 100 bytes (open, write, close)
#   ls-l     `ls -l` of them
#   stat     python: os.stat of each
#   read     python: open, read, close each
#   rm-rf    `rm -rf` of the directory
#   tar-x    extract a tarball of --tar-files small files (made once from
#            random text, 200 B to 8 KiB, in 40 directories)
#   git      `git init`, 200 files, `git add`, `git commit`, `git status`
#
# Options:
#   --rounds N       rounds (default 3)
#   --files N        files for create/ls/stat/read/rm (default 10000)
#   --bin DIR        keibi binaries (default: target/release, built first)
#   --mountd-arg A   pass A to keibi-mountd (repeatable)
#   --only LIST      comma-separated workloads (default all)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/packages.sh
. "$repo/scripts/lib/packages.sh"
# shellcheck source=scripts/lib/daemons.sh
. "$repo/scripts/lib/daemons.sh"

rounds=3
files=10000
tar_files=582
bin_dir=""
only=""
mountd_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rounds) rounds="$2"; shift ;;
        --files) files="$2"; shift ;;
        --tar-files) tar_files="$2"; shift ;;
        --bin) bin_dir="$2"; shift ;;
        --only) only="$2"; shift ;;
        --mountd-arg) mountd_args+=("$2"); shift ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "small.sh: unknown option $1 (see --help)" >&2
            exit 2
            ;;
    esac
    shift
done

require_root "it mounts a FUSE filesystem and runs keibi-syncd as nobody"
need_command fusermount3 fuse3
need_command findmnt util-linux
need_command setpriv util-linux
need_command git git
need_command python3 python3
install_needed

if [[ -z "$bin_dir" ]]; then
    find_cargo
    echo "== building keibi (release)"
    (cd "$repo" && cargo build --release --workspace --bins)
    bin_dir="$repo/target/release"
fi
KEIBI_BIN="$(cd "$bin_dir" && pwd)"

keibi_setup_workdir "$(mktemp -d /var/tmp/keibi-small.XXXXXX)"
native="$KEIBI_WORK/native"
mkdir -p "$native"
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    keibi_stop
    if [[ $rc -eq 0 ]]; then
        rm -rf "$KEIBI_WORK"
    else
        echo "small.sh: failed; logs are in $KEIBI_WORK" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The tarball: made once, outside both targets.
tarball="$KEIBI_WORK/src.tar"
python3 - "$KEIBI_WORK/tarsrc" "$tar_files" <<'EOF'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rnd = random.Random(8)
for i in range(n):
    d = os.path.join(root, "src", "d%02d" % (i % 40))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%04d.c" % i), "w") as f:
        f.write("".join(rnd.choice("abcdefgh \n") for _ in range(rnd.randint(200, 8192))))
EOF
tar -C "$KEIBI_WORK/tarsrc" -cf "$tarball" src
rm -rf "$KEIBI_WORK/tarsrc"

keibi_start_syncd
keibi_start_mountd "${mountd_args[@]}"
keibi_wait_mounted

now_ns() { date +%s%N; }
secs_since() { awk -v d=$(($(now_ns) - $1)) 'BEGIN { printf "%.3f\n", d / 1e9 }'; }

wl_all=(create ls-l stat read rm-rf tar-x git)
if [[ -n "$only" ]]; then IFS=, read -r -a wl <<<"$only"; else wl=("${wl_all[@]}"); fi
declare -A times

# run_wl WORKLOAD DIR: time one workload in DIR (a fresh dir per round).
run_wl() {
    local w="$1" d="$2" t0
    case "$w" in
        create)
            rm -rf "$d/many"
            mkdir "$d/many"
            t0=$(now_ns)
            python3 -c '
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
b = b"x" * 100
for i in range(n):
    with open(os.path.join(d, "f%06d" % i), "wb") as f:
        f.write(b)' "$d/many" "$files"
            ;;
        ls-l)
            t0=$(now_ns)
            ls -l "$d/many" >/dev/null
            ;;
        stat)
            t0=$(now_ns)
            python3 -c '
import os, sys
d = sys.argv[1]
for n in os.listdir(d):
    os.stat(os.path.join(d, n))' "$d/many"
            ;;
        read)
            t0=$(now_ns)
            python3 -c '
import os, sys
d = sys.argv[1]
for n in os.listdir(d):
    with open(os.path.join(d, n), "rb") as f:
        assert len(f.read()) == 100' "$d/many"
            ;;
        rm-rf)
            t0=$(now_ns)
            rm -rf "$d/many"
            ;;
        tar-x)
            rm -rf "$d/tar"
            mkdir "$d/tar"
            t0=$(now_ns)
            tar -C "$d/tar" -xf "$tarball"
            ;;
        git)
            rm -rf "$d/git"
            mkdir "$d/git"
            t0=$(now_ns)
            (
                cd "$d/git"
                git init -q .
                for i in $(seq 1 200); do echo "file $i" >"f$i.txt"; done
                git add .
                git -c user.name=b -c user.email=b@b commit -qm init
                git status --porcelain >/dev/null
            )
            ;;
    esac
    secs_since "$t0"
}

for ((r = 0; r < rounds; r++)); do
    if ((r % 2)); then order=(keibi native); else order=(native keibi); fi
    for w in "${wl[@]}"; do
        for t in "${order[@]}"; do
            if [[ $t == native ]]; then d="$native"; else d="$KEIBI_MNT"; fi
            s=$(run_wl "$w" "$d")
            times[$t:$w]+="$s "
        done
    done
    rm -rf "${native:?}"/* "${KEIBI_MNT:?}"/*
    echo "== round $((r + 1)) of $rounds done"
done

stats() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.3f %.3f %.3f\n", m, v[1], v[NR] }'; }

echo
echo "keibi $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?'), binaries $KEIBI_BIN, mountd args: ${mountd_args[*]:-none}"
echo "$(uname -r), $(nproc) CPUs; $files files, $tar_files in the tarball; median (min..max) of $rounds rounds, seconds"
printf '%-8s %22s %22s %7s\n' workload native keibi ratio
for w in "${wl[@]}"; do
    read -r nm nlo nhi < <(echo "${times[native:$w]}" | stats)
    read -r km klo khi < <(echo "${times[keibi:$w]}" | stats)
    printf '%-8s %7.3f (%5.3f..%5.3f) %7.3f (%5.3f..%5.3f) %7.1f\n' "$w" "$nm" "$nlo" "$nhi" "$km" "$klo" "$khi" \
        "$(awk -v a="$km" -v b="$nm" 'BEGIN { print (b > 0) ? a / b : 0 }')"
done
