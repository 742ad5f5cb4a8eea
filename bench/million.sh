#!/usr/bin/env bash
# keibi at scale: a store of --files files (default 1,000,000), and the
# figures issue "local speed" asks for at that size:
#
#   create        --files empty files made through the mount (--dirs
#                 directories of equal share, two processes at once);
#                 the rate, and keibi-syncd's RSS after it
#   ls -lR        the whole tree listed once through the mount
#                 (`ls -lR`, output discarded); its time, and
#                 keibi-mountd's and keibi-syncd's RSS after it
#   start-up      keibi-syncd stopped (SIGTERM) and started again on the
#                 same state: the seconds from its start until
#                 `keibictl status` answers, and its RSS then; then the
#                 seconds until a new mount answers `stat`
#   second ls -lR the same listing through the new mount: time and RSS
#   after a kill  keibi-syncd killed (SIGKILL) and started again: the same
#                 start-up figures (a start after a kill runs the start-up
#                 scan, which grows with the files; one after a clean stop
#                 skips it)
#
# Run as root:   bash bench/million.sh [--files N] [--dirs N] [--bin DIR]
#                                      [--dir DIR] [--keep] [--again]
#
# --again starts on the state an earlier run kept in --dir (--keep) and
# measures only the restarts and the second listing (--files then only
# labels the output).
#
# Builds the release binaries first unless --bin DIR names them. The work
# directory (default a new /var/tmp/keibi-million.*) holds the state,
# the mount and the logs; it is removed on success unless --keep (then
# the state can be started again, e.g. to profile a start-up, with
# scripts/lib/daemons.sh and KEIBI_WORK=DIR). Everything it starts
# is stopped on exit, also on failure or Ctrl-C. A million files take
# about half an hour to create on a 2-CPU VM (each is a create and a
# release through FUSE, and one store transaction).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/packages.sh
. "$repo/scripts/lib/packages.sh"
# shellcheck source=scripts/lib/daemons.sh
. "$repo/scripts/lib/daemons.sh"

files=1000000
dirs=100
bin_dir=""
work=""
keep=0
again=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --files) files="$2"; shift 2 ;;
        --dirs) dirs="$2"; shift 2 ;;
        --bin) bin_dir="$2"; shift 2 ;;
        --dir) work="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        --again) again=1; shift ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "million.sh: unknown option $1 (see --help)" >&2
            exit 2
            ;;
    esac
done
for n in "$files" "$dirs"; do
    if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "million.sh: --files and --dirs take a positive whole number, not '$n'" >&2
        exit 2
    fi
done

if [[ $again -eq 1 && ( -z "$work" || ! -d "$work/state" ) ]]; then
    echo "million.sh: --again needs --dir DIR holding the state a run kept with --keep" >&2
    exit 2
fi

require_root "it mounts a FUSE filesystem and runs keibi-syncd as nobody"
need_command fusermount3 fuse3
need_command findmnt util-linux
need_command setpriv util-linux
need_command python3 python3
if [[ -n "$bin_dir" ]]; then
    KEIBI_BIN="$(cd "$bin_dir" && pwd)"
else
    find_cargo
    echo "== building keibi (release)"
    (cd "$repo" && cargo build --release --workspace --bins)
    KEIBI_BIN="$repo/target/release"
fi

keibi_setup_workdir "${work:-$(mktemp -d /var/tmp/keibi-million.XXXXXX)}"
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    keibi_stop
    if [[ $rc -eq 0 && $keep -eq 0 ]]; then
        rm -rf "$KEIBI_WORK"
    elif [[ $rc -eq 0 ]]; then
        echo "million.sh: kept $KEIBI_WORK (--keep)"
    else
        echo "million.sh: failed; logs are in $KEIBI_WORK" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rss_mib() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
now() { date +%s.%N; }
since() { python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.2f}")' "$1" "$(now)"; }
status_answers() {
    _keibi_alive "$KEIBI_SYNCD_PID" || return 2
    "$KEIBI_BIN/keibictl" --socket "$KEIBI_CONTROL_SOCK" status >/dev/null 2>&1
}

keibi_start_syncd
keibi_start_mountd
keibi_wait_mounted

list() {
    local t
    sync
    echo 3 >/proc/sys/vm/drop_caches
    t="$(now)"
    ls -lR "$KEIBI_MNT/tree" >/dev/null
    echo "ls -lR of $files files: $(since "$t") s; keibi-mountd RSS $(rss_mib "$KEIBI_MOUNTD_PID") MiB, keibi-syncd RSS $(rss_mib "$KEIBI_SYNCD_PID") MiB"
}

# Stop both daemons ($1: "clean" = SIGTERM, "kill" = SIGKILL of
# keibi-syncd), drop the page cache, start keibi-syncd again and time it.
restart() {
    _keibi_term "$KEIBI_MOUNTD_PID" 30
    if [[ $1 == kill ]]; then
        # Reaped here, so that the shell does not report the kill.
        { kill -KILL "$KEIBI_SYNCD_PID" && wait "$KEIBI_SYNCD_PID"; } 2>/dev/null || true
    else
        _keibi_term "$KEIBI_SYNCD_PID" 60
    fi
    if keibi_is_mounted; then
        umount -l "$KEIBI_MNT"
    fi
    sync
    echo 3 >/proc/sys/vm/drop_caches
    rm -f "$KEIBI_FS_SOCK" "$KEIBI_CONTROL_SOCK"
    local t0
    t0="$(now)"
    keibi_start_syncd
    if ! keibi_poll 120 status_answers; then
        echo "million.sh: keibictl status got no answer within 120 s of the restart" >&2
        exit 1
    fi
    echo "start-up: keibictl status answers $(since "$t0") s after keibi-syncd started; keibi-syncd RSS $(rss_mib "$KEIBI_SYNCD_PID") MiB"
    keibi_start_mountd
    keibi_wait_mounted
    echo "mounted: $(since "$t0") s after keibi-syncd started"
}

if [[ $again -eq 1 ]]; then
    echo "== again on the kept state in $KEIBI_WORK ($(nproc) CPUs)"
else
echo "== $files files in $dirs directories on $KEIBI_MNT ($(nproc) CPUs)"

t0="$(now)"
python3 - "$KEIBI_MNT/tree" "$files" "$dirs" <<'PY'
import multiprocessing, os, sys, time
root, files, dirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.mkdir(root)
per = [files // dirs + (1 if d < files % dirs else 0) for d in range(dirs)]
for d in range(dirs):
    os.mkdir(os.path.join(root, f"d{d:05d}"))
def make(d):
    base = os.path.join(root, f"d{d:05d}")
    for i in range(per[d]):
        os.close(os.open(os.path.join(base, f"f{i:07d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return per[d]
start, done, step = time.monotonic(), 0, max(1, files // 10)
with multiprocessing.Pool(2) as pool:
    for n in pool.imap_unordered(make, range(dirs)):
        before, done = done, done + n
        if done // step != before // step:
            print(f"   {done} files, {done / (time.monotonic() - start):.0f} per second", flush=True)
PY
create_s="$(since "$t0")"
echo "create: $create_s s ($(python3 -c "print(f'{$files / $create_s:.0f}')") files per second); keibi-syncd RSS $(rss_mib "$KEIBI_SYNCD_PID") MiB"

list
fi

echo "== restart after a clean stop (SIGTERM)"
restart clean
list
echo "== restart after a kill (SIGKILL of keibi-syncd)"
restart kill
