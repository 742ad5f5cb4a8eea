#!/usr/bin/env bash
# Check the packaging files without installing anything:
#
#   - both systemd units pass `systemd-analyze verify` (the mountd template
#     as an instance, keibi-mountd@mnt-keibi.service);
#   - keibi-mountd's default --lock-dir is its unit's own RuntimeDirectory,
#     not syncd's;
#   - keibi.sysusers creates the keibi user (systemd-sysusers in a temp root);
#   - syncd.toml, with its commented keys enabled, is valid TOML and has
#     exactly the keys keibi-syncd knows;
#   - install.sh is valid shell;
#   - the Debian package builds from the tree and passes check-deb.sh
#     (contents, maintainer scripts, lintian, an installation into a
#     scratch root, remove and purge).
#
# `systemd-analyze verify` insists that ExecStart binaries exist. So the
# units are copied to a temp directory with /usr/local/bin/ replaced by the
# directory of the built binaries, and nothing else changed (checked).
#
# Usage: packaging/verify.sh [BIN_DIR]    (default: target/debug, then
#        target/release, of this checkout; build them first:
#        cargo build --workspace --bins)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

bin_dir="${1:-}"
if [[ -z "$bin_dir" ]]; then
    for d in "$repo/target/debug" "$repo/target/release"; do
        if [[ -x "$d/keibi-syncd" && -x "$d/keibi-mountd" ]]; then
            bin_dir="$d"
            break
        fi
    done
fi
if [[ -z "$bin_dir" || ! -x "$bin_dir/keibi-syncd" || ! -x "$bin_dir/keibi-mountd" ]]; then
    echo "verify.sh: keibi-syncd and keibi-mountd not found (build them: cargo build --workspace --bins)" >&2
    exit 1
fi
bin_dir="$(cd "$bin_dir" && pwd)"

for tool in systemd-analyze systemd-sysusers systemd-tmpfiles python3 dpkg-deb dpkg-shlibdeps lintian; do
    if ! command -v "$tool" >/dev/null; then
        echo "verify.sh: $tool is required" >&2
        exit 1
    fi
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

fail=0
step() { printf '== %s\n' "$*"; }

step "systemd-analyze verify (binaries from $bin_dir)"
mkdir "$tmp/units"
for unit in keibi-syncd.service keibi-mountd@.service; do
    sed "s|/usr/local/bin/|$bin_dir/|g" "$here/$unit" >"$tmp/units/$unit"
    # The copy may differ from the original in ExecStart lines only.
    changed="$(diff "$here/$unit" "$tmp/units/$unit" | grep '^[<>]' | grep -v '^[<>] ExecStart=' || true)"
    if [[ -n "$changed" ]]; then
        echo "verify.sh: rewriting $unit touched more than ExecStart:" >&2
        echo "$changed" >&2
        fail=1
    fi
done
if ! out="$(systemd-analyze verify "$tmp/units/keibi-syncd.service" "$tmp/units/keibi-mountd@mnt-keibi.service" 2>&1)"; then
    fail=1
fi
if [[ -n "$out" ]]; then
    # verify prints nothing for clean units; any line is a finding.
    echo "$out" >&2
    fail=1
else
    echo "ok: keibi-syncd.service, keibi-mountd@mnt-keibi.service"
fi

step "keibi-mountd's lock directory is the mountd unit's own RuntimeDirectory"
default_lock_dir="$("$bin_dir/keibi-mountd" --help | sed -n 's/.*\[default: \(\/run\/[^]]*\)\].*/\1/p' | head -1)"
runtime_dir="$(sed -n 's/^RuntimeDirectory=//p' "$here/keibi-mountd@.service")"
syncd_runtime_dir="$(sed -n 's/^RuntimeDirectory=//p' "$here/keibi-syncd.service")"
if [[ -n "$default_lock_dir" && "$default_lock_dir" == "/run/$runtime_dir" && "$runtime_dir" != "$syncd_runtime_dir" ]]; then
    echo "ok: --lock-dir defaults to $default_lock_dir (RuntimeDirectory=$runtime_dir, not syncd's $syncd_runtime_dir)"
else
    echo "verify.sh: keibi-mountd's default --lock-dir ($default_lock_dir) must be /run/<its unit's RuntimeDirectory> ($runtime_dir), apart from syncd's ($syncd_runtime_dir)" >&2
    fail=1
fi

step "systemd-sysusers creates the keibi user"
mkdir -p "$tmp/root/etc" "$tmp/root/usr/lib/sysusers.d"
: >"$tmp/root/etc/passwd"
: >"$tmp/root/etc/group"
cp "$here/keibi.sysusers" "$tmp/root/usr/lib/sysusers.d/keibi.conf"
if systemd-sysusers --root="$tmp/root" >/dev/null 2>&1 &&
    grep -q '^keibi:x:[0-9]*:[0-9]*:.*:/usr/sbin/nologin$' "$tmp/root/etc/passwd" &&
    grep -q '^keibi:x:' "$tmp/root/etc/group"; then
    echo "ok: $(grep '^keibi:' "$tmp/root/etc/passwd")"
else
    echo "verify.sh: keibi.sysusers did not create the keibi user and group" >&2
    fail=1
fi

step "syncd.toml keys"
if python3 - "$here/syncd.toml" <<'PY'; then
import re, sys, tomllib
text = open(sys.argv[1]).read()
enabled = re.sub(r"(?m)^#([a-z_]+ = )", r"\1", text)
keys = set(tomllib.loads(enabled))
want = {"state_dir", "fs_socket", "control_socket", "control_socket_mode",
        "control_socket_owner", "control_socket_group", "mountd_uid", "share_owner",
        "listen", "peer_timeout", "peer_reconnect_max", "peer_rekey_bytes",
        "peer_rekey_interval", "peer_aead", "eager_fetch_max", "store_cache", "fetch_parallel",
        "fetch_readahead_max", "log_target", "metrics_socket", "metrics_listen"}
if keys != want:
    sys.exit(f"syncd.toml keys differ: missing {sorted(want - keys)}, unknown {sorted(keys - want)}")
if tomllib.loads(text):
    sys.exit("syncd.toml should leave every key commented (defaults)")
print("ok:", ", ".join(sorted(keys)))
PY
    :
else
    fail=1
fi

step "install.sh syntax"
if bash -n "$here/install.sh"; then
    echo "ok"
else
    fail=1
fi

step "Debian package (check-deb.sh)"
if ! bash "$here/check-deb.sh" "$bin_dir"; then
    fail=1
fi

if [[ $fail -ne 0 ]]; then
    echo "verify.sh: FAILED" >&2
    exit 1
fi
echo "verify.sh: all packaging checks passed"
