# shellcheck shell=bash
# Running keibi-syncd and keibi-mountd by hand, outside systemd, in a
# throw-away directory: what demo.sh and bench/run.sh share.
#
#   keibi_setup_workdir [DIR]   sets KEIBI_WORK (made if not given) with
#                               state/ (syncd's, owned by the syncd user),
#                               run/ (sockets and mountd's lock dir),
#                               mnt/ (the mountpoint), syncd.toml (peer
#                               listen address: a free port of 127.0.0.1),
#                               logs in KEIBI_WORK
#   keibi_start_syncd           starts syncd as KEIBI_SYNCD_USER (nobody)
#   keibi_start_peer NAME       starts one more syncd (no mount) in
#                               KEIBI_WORK/NAME with its own state, sockets
#                               and port; sets KEIBI_PEER_CONTROL_SOCK and
#                               KEIBI_PEER_PORT; keibi_stop stops it too
#   keibi_start_mountd [ARGS]   starts mountd (root) with extra ARGS
#   keibi_wait_mounted          polls until the mount is up (bounded)
#   keibi_stop                  SIGTERM to both, bounded wait, lazy unmount
#                               if a mount is left; safe to call twice
#
# Inputs: KEIBI_BIN (directory of the binaries), KEIBI_SYNCD_USER.
# Outputs: KEIBI_WORK, KEIBI_STATE, KEIBI_RUN, KEIBI_MNT, KEIBI_SYNCD_PID,
# KEIBI_MOUNTD_PID, KEIBI_FS_SOCK, KEIBI_CONTROL_SOCK, KEIBI_CONFIG,
# KEIBI_PORT.

: "${KEIBI_SYNCD_USER:=nobody}"
KEIBI_SYNCD_PID=""
KEIBI_MOUNTD_PID=""
KEIBI_PEER_PIDS=()

# A TCP port of 127.0.0.1 that is free now.
keibi_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

keibi_setup_workdir() {
    KEIBI_WORK="${1:-$(mktemp -d /tmp/keibi.XXXXXX)}"
    mkdir -p "$KEIBI_WORK"
    # syncd runs as another user and must reach state/ and run/ inside.
    chmod 0755 "$KEIBI_WORK"
    KEIBI_STATE="$KEIBI_WORK/state"
    KEIBI_RUN="$KEIBI_WORK/run"
    KEIBI_MNT="$KEIBI_WORK/mnt"
    KEIBI_FS_SOCK="$KEIBI_RUN/fs.sock"
    KEIBI_CONTROL_SOCK="$KEIBI_RUN/control.sock"
    mkdir -p "$KEIBI_STATE" "$KEIBI_RUN" "$KEIBI_MNT"
    chown "$KEIBI_SYNCD_USER:" "$KEIBI_STATE" "$KEIBI_RUN"
    chmod 0700 "$KEIBI_STATE"
    chmod 0755 "$KEIBI_RUN"
    # Peers only on loopback, on a free port: never the default 0.0.0.0:58150.
    KEIBI_PORT="$(keibi_free_port)"
    KEIBI_CONFIG="$KEIBI_WORK/syncd.toml"
    printf 'listen = ["127.0.0.1:%s"]\n' "$KEIBI_PORT" >"$KEIBI_CONFIG"
    chmod 0644 "$KEIBI_CONFIG"
}

# Poll `$@` every 0.1 s until it succeeds (return 0), for at most $1
# seconds (then return 1). A status of 2 from `$@` means "will never
# succeed" (the process died) and ends the wait at once.
keibi_poll() {
    local limit="$1" rc
    shift
    local end=$((SECONDS + limit))
    while true; do
        if "$@"; then
            return 0
        else
            rc=$?
        fi
        if ((rc == 2 || SECONDS >= end)); then
            return 1
        fi
        sleep 0.1
    done
}

_keibi_alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; }
_keibi_gone() { ! kill -0 "$1" 2>/dev/null; }

keibi_start_syncd() {
    # setsid (we are not a group leader) and setpriv both exec, so $! is
    # syncd itself; its own session keeps terminal signals away (--keep).
    setsid setpriv --reuid="$KEIBI_SYNCD_USER" --regid="$(id -g "$KEIBI_SYNCD_USER")" --clear-groups \
        "$KEIBI_BIN/keibi-syncd" \
        --config "$KEIBI_CONFIG" \
        --state-dir "$KEIBI_STATE" \
        --fs-socket "$KEIBI_FS_SOCK" \
        --control-socket "$KEIBI_CONTROL_SOCK" \
        </dev/null >>"$KEIBI_WORK/syncd.log" 2>&1 &
    KEIBI_SYNCD_PID=$!
    if ! keibi_poll 20 _keibi_sockets_ready; then
        echo "keibi-syncd did not create its sockets within 20 s; its log:" >&2
        tail -n 30 "$KEIBI_WORK/syncd.log" >&2
        return 1
    fi
}

_keibi_sockets_ready() {
    _keibi_alive "$KEIBI_SYNCD_PID" || return 2
    [[ -S "$KEIBI_FS_SOCK" && -S "$KEIBI_CONTROL_SOCK" ]]
}

keibi_start_peer() {
    local dir="$KEIBI_WORK/$1"
    mkdir -p "$dir/state" "$dir/run"
    chmod 0755 "$dir"
    chown "$KEIBI_SYNCD_USER:" "$dir/state" "$dir/run"
    chmod 0700 "$dir/state"
    KEIBI_PEER_PORT="$(keibi_free_port)"
    KEIBI_PEER_CONTROL_SOCK="$dir/run/control.sock"
    printf 'listen = ["127.0.0.1:%s"]\n' "$KEIBI_PEER_PORT" >"$dir/syncd.toml"
    chmod 0644 "$dir/syncd.toml"
    setsid setpriv --reuid="$KEIBI_SYNCD_USER" --regid="$(id -g "$KEIBI_SYNCD_USER")" --clear-groups \
        "$KEIBI_BIN/keibi-syncd" \
        --config "$dir/syncd.toml" \
        --state-dir "$dir/state" \
        --fs-socket "$dir/run/fs.sock" \
        --control-socket "$KEIBI_PEER_CONTROL_SOCK" \
        </dev/null >>"$dir/syncd.log" 2>&1 &
    KEIBI_PEER_PIDS+=($!)
    if ! keibi_poll 20 _keibi_peer_ready "$!"; then
        echo "keibi-syncd $1 did not create its control socket within 20 s; its log:" >&2
        tail -n 30 "$dir/syncd.log" >&2
        return 1
    fi
}

_keibi_peer_ready() {
    _keibi_alive "$1" || return 2
    [[ -S "$KEIBI_PEER_CONTROL_SOCK" ]]
}

keibi_start_mountd() {
    setsid "$KEIBI_BIN/keibi-mountd" "$KEIBI_MNT" \
        --syncd-socket "$KEIBI_FS_SOCK" \
        --lock-dir "$KEIBI_WORK/locks" \
        "$@" \
        </dev/null >>"$KEIBI_WORK/mountd.log" 2>&1 &
    KEIBI_MOUNTD_PID=$!
}

keibi_is_mounted() {
    [[ "$(findmnt -n -o FSTYPE --mountpoint "$KEIBI_MNT" 2>/dev/null)" == "fuse.keibi" ]]
}

_keibi_mount_ready() {
    _keibi_alive "$KEIBI_MOUNTD_PID" || return 2
    keibi_is_mounted && stat "$KEIBI_MNT/." >/dev/null 2>&1
}

keibi_wait_mounted() {
    if ! keibi_poll 20 _keibi_mount_ready; then
        echo "the mount at $KEIBI_MNT did not come up within 20 s; mountd's log:" >&2
        tail -n 30 "$KEIBI_WORK/mountd.log" >&2
        return 1
    fi
}

# SIGTERM to a pid, then wait for it for at most $2 seconds.
_keibi_term() {
    local pid="$1" limit="$2"
    _keibi_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    if ! keibi_poll "$limit" _keibi_gone "$pid"; then
        echo "pid $pid did not exit within $limit s of SIGTERM; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

keibi_stop() {
    # mountd first: it unmounts; then syncd flushes its store.
    _keibi_term "$KEIBI_MOUNTD_PID" 10
    KEIBI_MOUNTD_PID=""
    if [[ -n "${KEIBI_MNT:-}" ]] && keibi_is_mounted; then
        echo "a keibi mount is still at $KEIBI_MNT; detaching it (umount -l)" >&2
        umount -l "$KEIBI_MNT" || true
    fi
    _keibi_term "$KEIBI_SYNCD_PID" 10
    KEIBI_SYNCD_PID=""
    local p
    for p in "${KEIBI_PEER_PIDS[@]}"; do
        _keibi_term "$p" 10
    done
    KEIBI_PEER_PIDS=()
}

# Several complete nodes on this machine (demo.sh, bench/sync.sh): each
# node NAME has its own directory $KEIBI_WORK/NAME with state/ (syncd's,
# owned by KEIBI_SYNCD_USER), run/ (sockets), mnt/ (its mountpoint),
# locks/ (mountd's), syncd.toml (peers on a free port of 127.0.0.1) and
# the logs syncd.log and mountd.log.
#
#   keibi_node_up NAME [MOUNTD ARGS]   starts its syncd and mountd and
#                                      waits (bounded) for the mount;
#                                      KEIBI_NODE_SYNCD_EXTRA: more lines
#                                      for its syncd.toml (bench tuning)
#   keibi_node_ctl NAME ARGS...        keibictl on its control socket
#   keibi_node_dir NAME                prints its directory (mount: /mnt)
#   keibi_node_fingerprint NAME        prints its fingerprint
#   keibi_pair A B                     pairs A and B (A dials B's port,
#                                      B waits to be dialed) and waits
#                                      (bounded) until both are connected
#   keibi_nodes_stop                   SIGTERM to every mountd (they
#                                      unmount), then every syncd; safe
#                                      to call twice
declare -A KEIBI_NODE_SYNCD_PID=() KEIBI_NODE_MOUNTD_PID=() KEIBI_NODE_PORT=()
KEIBI_NODES=()

keibi_node_dir() { echo "$KEIBI_WORK/$1"; }

keibi_node_ctl() {
    local name="$1"
    shift
    "$KEIBI_BIN/keibictl" --socket "$KEIBI_WORK/$name/run/control.sock" "$@"
}

keibi_node_fingerprint() {
    keibi_node_ctl "$1" id --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["fingerprint"])'
}

_keibi_node_ready() {
    _keibi_alive "${KEIBI_NODE_SYNCD_PID[$1]}" || return 2
    [[ -S "$KEIBI_WORK/$1/run/fs.sock" && -S "$KEIBI_WORK/$1/run/control.sock" ]]
}

_keibi_node_mounted() {
    _keibi_alive "${KEIBI_NODE_MOUNTD_PID[$1]}" || return 2
    [[ "$(findmnt -n -o FSTYPE --mountpoint "$KEIBI_WORK/$1/mnt" 2>/dev/null)" == "fuse.keibi" ]] &&
        stat "$KEIBI_WORK/$1/mnt/." >/dev/null 2>&1
}

keibi_node_up() {
    local name="$1"
    shift
    local dir="$KEIBI_WORK/$name"
    mkdir -p "$dir/state" "$dir/run" "$dir/mnt"
    chmod 0755 "$dir"
    chown "$KEIBI_SYNCD_USER:" "$dir/state" "$dir/run"
    chmod 0700 "$dir/state"
    chmod 0755 "$dir/run"
    KEIBI_NODE_PORT[$name]="$(keibi_free_port)"
    printf 'listen = ["127.0.0.1:%s"]\npeer_timeout = "5s"\npeer_reconnect_max = "2s"\n%s\n' \
        "${KEIBI_NODE_PORT[$name]}" "${KEIBI_NODE_SYNCD_EXTRA:-}" >"$dir/syncd.toml"
    chmod 0644 "$dir/syncd.toml"
    KEIBI_NODES+=("$name")
    setsid setpriv --reuid="$KEIBI_SYNCD_USER" --regid="$(id -g "$KEIBI_SYNCD_USER")" --clear-groups \
        "$KEIBI_BIN/keibi-syncd" \
        --config "$dir/syncd.toml" \
        --state-dir "$dir/state" \
        --fs-socket "$dir/run/fs.sock" \
        --control-socket "$dir/run/control.sock" \
        </dev/null >>"$dir/syncd.log" 2>&1 &
    KEIBI_NODE_SYNCD_PID[$name]=$!
    if ! keibi_poll 20 _keibi_node_ready "$name"; then
        echo "$name: keibi-syncd did not create its sockets within 20 s; its log:" >&2
        tail -n 30 "$dir/syncd.log" >&2
        return 1
    fi
    setsid "$KEIBI_BIN/keibi-mountd" "$dir/mnt" \
        --syncd-socket "$dir/run/fs.sock" \
        --lock-dir "$dir/locks" \
        "$@" \
        </dev/null >>"$dir/mountd.log" 2>&1 &
    KEIBI_NODE_MOUNTD_PID[$name]=$!
    if ! keibi_poll 20 _keibi_node_mounted "$name"; then
        echo "$name: the mount at $dir/mnt did not come up within 20 s; mountd's log:" >&2
        tail -n 30 "$dir/mountd.log" >&2
        return 1
    fi
}

_keibi_pair_connected() {
    local me="$1" fp="$2"
    keibi_node_ctl "$me" peer list --json | python3 -c '
import json, sys
sys.exit(0 if any(p["fingerprint"] == sys.argv[1] and p["state"] == "connected" for p in json.load(sys.stdin)) else 1)' "$fp"
}

keibi_pair() {
    local a="$1" b="$2" fp_a fp_b
    fp_a="$(keibi_node_fingerprint "$a")"
    fp_b="$(keibi_node_fingerprint "$b")"
    keibi_node_ctl "$a" peer add "$fp_b" --name "$b" --addr "127.0.0.1:${KEIBI_NODE_PORT[$b]}"
    keibi_node_ctl "$b" peer add "$fp_a" --name "$a"
    if ! keibi_poll 30 _keibi_pair_connected "$a" "$fp_b" || ! keibi_poll 30 _keibi_pair_connected "$b" "$fp_a"; then
        echo "$a and $b did not connect within 30 s; logs: $KEIBI_WORK/$a/syncd.log, $KEIBI_WORK/$b/syncd.log" >&2
        return 1
    fi
}

keibi_nodes_stop() {
    local n mnt
    for n in "${KEIBI_NODES[@]}"; do
        _keibi_term "${KEIBI_NODE_MOUNTD_PID[$n]:-}" 10
        KEIBI_NODE_MOUNTD_PID[$n]=""
        mnt="$KEIBI_WORK/$n/mnt"
        if [[ "$(findmnt -n -o FSTYPE --mountpoint "$mnt" 2>/dev/null)" == "fuse.keibi" ]]; then
            echo "a keibi mount is still at $mnt; detaching it (umount -l)" >&2
            umount -l "$mnt" || true
        fi
    done
    for n in "${KEIBI_NODES[@]}"; do
        _keibi_term "${KEIBI_NODE_SYNCD_PID[$n]:-}" 10
        KEIBI_NODE_SYNCD_PID[$n]=""
    done
}
