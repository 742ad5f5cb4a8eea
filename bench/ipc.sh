#!/usr/bin/env bash
# keibi IPC round-trip benchmark: what one request and its answer cost
# between two processes on a Unix socket, from the floor (blocking writes
# and reads of 64 bytes) to keibi's stack (tarpc on
# ipc_schema::transport::framed, a task per call on each side), with the
# runtimes keibi uses (one worker on each side, see FS_WORKERS in syncd and
# RUNTIME_WORKERS in mountd) and with two workers each for comparison.
#
# Run:   bash bench/ipc.sh [--calls N] [--runs N]
#
#   --calls N   round trips per measurement (default 20000)
#   --runs N    runs per row; the median is printed (default 3)
#
# The "raw, one CPU" row pins both processes to CPU 0 (taskset): the
# difference to "raw" is what waking a process on the other CPU costs,
# which on a virtual machine is most of a round trip.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/packages.sh
. "$repo/scripts/lib/packages.sh"

calls=20000
runs=3
while [[ $# -gt 0 ]]; do
    case "$1" in
        --calls) calls="$2"; shift ;;
        --runs) runs="$2"; shift ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "ipc.sh: unknown option $1 (see --help)" >&2
            exit 2
            ;;
    esac
    shift
done
for n in "$calls" "$runs"; do
    if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "ipc.sh: $n is not a positive number" >&2
        exit 2
    fi
done

find_cargo
need_command taskset util-linux
install_needed

echo "== building the probe (release)"
(cd "$repo" && cargo build --release -q -p keibi-ipc-schema --example ipc_rtt)
probe="$repo/target/release/examples/ipc_rtt"

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# row LABEL CLIENT_WORKERS SERVER_WORKERS PIN MODE
row() {
    local label="$1" cw="$2" sw="$3" pin="$4" mode="$5" i v all=()
    for ((i = 0; i < runs; i++)); do
        if [[ "$pin" == 1 ]]; then
            v="$(CLIENT_WORKERS=$cw SERVER_WORKERS=$sw taskset -c 0 "$probe" "$mode" "$calls")"
        else
            v="$(CLIENT_WORKERS=$cw SERVER_WORKERS=$sw "$probe" "$mode" "$calls")"
        fi
        all+=("$(awk '{ print $(NF - 1) }' <<<"$v")")
    done
    printf '%-46s %8s   (runs: %s)\n' "$label" "$(printf '%s\n' "${all[@]}" | median)" "${all[*]}"
}

echo
echo "$(nproc) CPUs, $(uname -r); $calls round trips per run, median of $runs runs"
printf '%-46s %8s\n' "round trip between two processes" "µs"
row "raw: blocking write + read, one CPU" 0 0 1 raw
row "raw: blocking write + read" 0 0 0 raw
row "framed: tokio, current-thread runtimes" 0 0 0 framed
row "tarpc: current-thread runtimes" 0 0 0 tarpc
row "tarpc: one worker each side (keibi)" 1 1 0 tarpc
row "tarpc: two workers each side" 2 2 0 tarpc
