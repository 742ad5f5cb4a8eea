#!/usr/bin/env bash
# keibi peer channel benchmark: payload throughput of one encrypted channel
# between two keibi-syncd on 127.0.0.1, next to raw TCP on the same
# loopback, measured in the same run.
#
# Run as root:   bash bench/channel.sh [options]
#
# Builds the release binaries, starts two keibi-syncd (as `nobody`, each
# with its own state directory in /tmp/keibi-chan.*, listening on a free
# port of 127.0.0.1), pairs them and waits for the connection. Then:
#
#   channel   `keibictl peer bench --bytes B --streams S` for S = 1 and 4:
#             syncd A asks syncd B for S concurrent Bulk streams totalling
#             B bytes and times the payload that comes back (encrypted,
#             framed, multiplexed, flow-controlled: the whole channel)
#   raw TCP   the same number of bytes over S plain TCP connections on
#             127.0.0.1 (a small python3 sender and receiver, 256 KiB
#             writes): the loopback ceiling the channel is compared with
#   handshake the `handshake_ms` syncd logs for each connection it made
#
# Each figure is the median of --runs runs (default 3); the single runs
# are printed too. MB is 10^6 bytes. The ratio is channel / raw TCP. Next
# to MB/s, MB per CPU second: the bytes moved over the CPU time the movers
# used (both syncd together; the python process for raw TCP), which other
# work on the machine does not change the way it changes MB/s.
# Throughput on a shared 2-CPU machine varies from run to run; compare
# figures from the same run.
#
# Options:
#   --runs N      runs per measurement (default 3)
#   --bytes N     bytes per run (default 1073741824, 1 GiB)
#   --bin DIR     use the binaries in DIR instead of building the release
#   --keep        keep the work directory (logs) afterwards
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/packages.sh
. "$repo/scripts/lib/packages.sh"

runs=3
bytes=1073741824
bin_dir=""
keep=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) runs="$2"; shift ;;
        --bytes) bytes="$2"; shift ;;
        --bin) bin_dir="$2"; shift ;;
        --keep) keep=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "channel.sh: unknown option $1 (see --help)" >&2
            exit 2
            ;;
    esac
    shift
done
for n in "$runs" "$bytes"; do
    if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "channel.sh: $n is not a positive number" >&2
        exit 2
    fi
done

require_root "it starts keibi-syncd as the unprivileged user nobody"
need_command setpriv util-linux
need_command python3 python3
if [[ -z "$bin_dir" ]]; then
    find_cargo
fi
install_needed

if [[ -z "$bin_dir" ]]; then
    echo "== building keibi (release)"
    (cd "$repo" && cargo build --release --workspace --bins)
    bin_dir="$repo/target/release"
fi
for b in keibi-syncd keibictl; do
    [[ -x "$bin_dir/$b" ]] || { echo "channel.sh: $bin_dir/$b is missing" >&2; exit 1; }
done

work="$(mktemp -d /tmp/keibi-chan.XXXXXX)"
chmod 0755 "$work"
pids=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for p in "${pids[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    if [[ $rc -ne 0 ]]; then
        for n in a b; do
            [[ -f "$work/$n/syncd.log" ]] && { echo "--- syncd $n log:" >&2; tail -n 20 "$work/$n/syncd.log" >&2; }
        done
    fi
    if [[ $rc -eq 0 && $keep -eq 0 ]]; then
        rm -rf "$work"
    else
        echo "channel.sh: work directory (logs) kept in $work" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

json_field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

ctl() {
    local node="$1"
    shift
    "$bin_dir/keibictl" --socket "$work/$node/run/control.sock" --timeout 600s "$@"
}

# Start the syncd of node $1 on port $2.
start_node() {
    local node="$1" port="$2" dir="$work/$1"
    mkdir -p "$dir/state" "$dir/run"
    chmod 0755 "$dir"
    chown nobody: "$dir/state" "$dir/run"
    chmod 0700 "$dir/state"
    cat >"$dir/syncd.toml" <<EOF
listen = ["127.0.0.1:$port"]
peer_timeout = "5s"
peer_reconnect_max = "2s"
EOF
    chmod 0644 "$dir/syncd.toml"
    setsid setpriv --reuid=nobody --regid="$(id -g nobody)" --clear-groups \
        "$bin_dir/keibi-syncd" --config "$dir/syncd.toml" \
        --state-dir "$dir/state" --fs-socket "$dir/run/fs.sock" \
        --control-socket "$dir/run/control.sock" \
        </dev/null >>"$dir/syncd.log" 2>&1 &
    pids+=($!)
    local end=$((SECONDS + 20))
    until ctl "$node" id --json >/dev/null 2>&1; do
        if ((SECONDS >= end)) || ! kill -0 "${pids[-1]}" 2>/dev/null; then
            echo "channel.sh: syncd $node did not come up" >&2
            return 1
        fi
        sleep 0.1
    done
}

port_a="$(free_port)"
port_b="$(free_port)"
start_node a "$port_a"
start_node b "$port_b"
fp_a="$(ctl a id --json | json_field fingerprint)"
fp_b="$(ctl b id --json | json_field fingerprint)"
# b first, so that a's first dial is not refused as unpaired.
ctl b peer add "$fp_a" --name a --json >/dev/null
ctl a peer add "$fp_b" --addr "127.0.0.1:$port_b" --name b --json >/dev/null

state_of() {
    ctl a peer list --json | python3 -c '
import json, sys
fp = sys.argv[1]
print(next((p["state"] for p in json.load(sys.stdin) if p["fingerprint"] == fp), "absent"))' "$fp_b"
}
end=$((SECONDS + 30))
until [[ "$(state_of)" == connected ]]; do
    if ((SECONDS >= end)); then
        echo "channel.sh: the two syncd did not connect within 30 s" >&2
        exit 1
    fi
    sleep 0.1
done

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.0f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# CPU time (user + system) of both syncd so far, in clock ticks.
syncd_ticks() { awk '{ t += $14 + $15 } END { print t }' /proc/"${pids[0]}"/stat /proc/"${pids[1]}"/stat; }

# "MB/s MB-per-CPU-second" of one channel bench with $1 streams (CPU: both
# syncd together, sender and receiver).
channel_mbps() {
    local t0 t1 out
    t0=$(syncd_ticks)
    out="$(ctl a peer bench "$fp_b" --bytes "$bytes" --streams "$1" --json)"
    t1=$(syncd_ticks)
    python3 -c '
import json, sys
r = json.loads(sys.argv[1])
got, want, secs = r["bytes"], int(sys.argv[2]), r["seconds"]
cpu = max(int(sys.argv[3]) / int(sys.argv[4]), 1e-3)
if got != want:
    sys.exit("bench moved %d bytes, not %d" % (got, want))
print("%.0f %.0f" % (got / secs / 1e6, got / cpu / 1e6))' "$out" "$bytes" "$((t1 - t0))" "$(getconf CLK_TCK)"
}

# "MB/s MB-per-CPU-second" of $bytes over $1 plain TCP connections on
# 127.0.0.1 (CPU: the python process, sender and receiver).
raw_mbps() {
    python3 - "$1" "$bytes" <<'EOF'
import os, socket, sys, threading, time
streams, total = int(sys.argv[1]), int(sys.argv[2])
per = total // streams
chunk = bytes(256 * 1024)
lsock = socket.socket()
lsock.bind(("127.0.0.1", 0))
lsock.listen(streams)
port = lsock.getsockname()[1]
def receive():
    conn, _ = lsock.accept()
    buf = bytearray(256 * 1024)
    got = 0
    while got < per:
        n = conn.recv_into(buf)
        if n == 0:
            break
        got += n
    conn.close()
def send():
    s = socket.create_connection(("127.0.0.1", port))
    left = per
    view = memoryview(chunk)
    while left > 0:
        n = min(left, len(chunk))
        s.sendall(view[:n])
        left -= n
    s.close()
receivers = [threading.Thread(target=receive) for _ in range(streams)]
for t in receivers:
    t.start()
t0 = time.perf_counter()
cpu0 = sum(os.times()[:2])
senders = [threading.Thread(target=send) for _ in range(streams)]
for t in senders:
    t.start()
for t in senders + receivers:
    t.join()
wall = time.perf_counter() - t0
cpu = max(sum(os.times()[:2]) - cpu0, 1e-3)
print(f"{per * streams / wall / 1e6:.0f} {per * streams / cpu / 1e6:.0f}")
EOF
}

echo
echo "== peer channel between two keibi-syncd on 127.0.0.1: $bytes bytes per run, $runs runs"
# Other work on the machine takes CPU from both columns, not always
# equally: say how busy it was.
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg), CPUs: $(nproc)"
printf '%-8s %14s %14s %7s %12s %12s %7s\n' streams "channel MB/s" "raw TCP MB/s" ratio "channel MB/" "raw MB/" ratio
printf '%-8s %14s %14s %7s %12s %12s %7s\n' "" "" "" "" "CPU-second" "CPU-second" ""
for streams in 1 4; do
    ch=()
    raw=()
    ch_cpu=()
    raw_cpu=()
    for ((i = 0; i < runs; i++)); do
        read -r speed per_cpu < <(channel_mbps "$streams")
        ch+=("$speed")
        ch_cpu+=("$per_cpu")
        read -r speed per_cpu < <(raw_mbps "$streams")
        raw+=("$speed")
        raw_cpu+=("$per_cpu")
    done
    ch_med="$(printf '%s\n' "${ch[@]}" | median)"
    raw_med="$(printf '%s\n' "${raw[@]}" | median)"
    ch_cpu_med="$(printf '%s\n' "${ch_cpu[@]}" | median)"
    raw_cpu_med="$(printf '%s\n' "${raw_cpu[@]}" | median)"
    ratio="$(awk -v a="$ch_med" -v b="$raw_med" 'BEGIN { printf "%.2f", a / b }')"
    cpu_ratio="$(awk -v a="$ch_cpu_med" -v b="$raw_cpu_med" 'BEGIN { printf "%.2f", a / b }')"
    printf '%-8s %14s %14s %7s %12s %12s %7s\n' "$streams" "$ch_med" "$raw_med" "$ratio" "$ch_cpu_med" "$raw_cpu_med" "$cpu_ratio"
    echo "         runs: channel ${ch[*]} MB/s (${ch_cpu[*]} MB/CPU-s); raw ${raw[*]} MB/s (${raw_cpu[*]} MB/CPU-s)"
done

echo
hs="$(grep -ho 'handshake_ms=[0-9.]*' "$work/a/syncd.log" "$work/b/syncd.log" | cut -d= -f2 || true)"
if [[ -n "$hs" ]]; then
    echo "handshake (ms, as logged by syncd, per side): $(echo "$hs" | tr '\n' ' ')"
else
    echo "handshake: syncd logged no handshake_ms"
fi
rekeys="$(ctl a peer list --json | python3 -c '
import json, sys
print(next(p["rekeys"] for p in json.load(sys.stdin) if p["fingerprint"] == sys.argv[1]))' "$fp_b")"
echo "rekeys on the connection so far: $rekeys"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
