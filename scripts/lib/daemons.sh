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
