#!/usr/bin/env bash
# Run every keibi check: formatting, clippy, build, packaging verification,
# then all tests, including the end-to-end tests on a real FUSE mount with
# real daemons.
#
# Run as root on Debian 12 (or similar):   bash scripts/test.sh
#
# Needs root and a working /dev/fuse: the end-to-end tests mount, run
# keibi-syncd as an unprivileged user and use the mount as other users.
# Without them this script fails (it does not skip those tests).
#
# Installs what is missing with apt-get (one `apt-get update` only when
# something must be installed): fuse3, sqlite3, git, tar, util-linux,
# iproute2 (ip, tc: the two-node tests' network namespaces), nftables
# (the stalled-link tests), systemd (systemd-analyze), dpkg-dev, binutils and
# lintian (the Debian package's check), python3, gcc. Rust (cargo, rustfmt,
# clippy; 1.95+) must already be installed (https://rustup.rs).
#
# Environment: KEIBI_TEST_THREADS (default 2) is passed to the test
# harness as --test-threads; extra arguments go to `cargo test` after `--`.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/packages.sh
. "$repo/scripts/lib/packages.sh"

require_root "the end-to-end tests mount FUSE filesystems and switch users"
find_cargo
need_command fusermount3 fuse3
need_command sqlite3 sqlite3
need_command git git
need_command tar tar
need_command findmnt util-linux
need_command setpriv util-linux
need_command unshare util-linux
need_command ss iproute2
need_command ip iproute2
need_command tc iproute2
need_command nft nftables
need_command systemd-analyze systemd
need_command systemd-sysusers systemd
need_command dpkg-shlibdeps dpkg-dev
need_command lintian lintian
need_command strip binutils
need_command python3 python3
need_command cc gcc
install_needed

if [[ ! -e /dev/fuse ]]; then
    modprobe fuse 2>/dev/null || true
fi
if [[ ! -c /dev/fuse ]] || ! (exec 3<>/dev/fuse) 2>/dev/null; then
    echo "test.sh: /dev/fuse is missing or cannot be opened; the end-to-end tests need a real FUSE device" >&2
    echo "test.sh: (in a container: --device /dev/fuse --cap-add SYS_ADMIN; on a VM: modprobe fuse)" >&2
    exit 1
fi

for tool in rustfmt cargo-clippy; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "test.sh: $tool not found; install it with: rustup component add ${tool#cargo-}" >&2
        exit 1
    fi
done

cd "$repo"
threads="${KEIBI_TEST_THREADS:-2}"
started=$SECONDS

step() {
    local name="$1"
    shift
    local t0=$SECONDS
    echo
    echo "== $name"
    if "$@"; then
        echo "== $name: ok ($((SECONDS - t0)) s)"
    else
        local rc=$?
        echo "test.sh: FAILED at step '$name' (exit status $rc)" >&2
        exit 1
    fi
}

# The shell scripts parse, and the benchmark's help and Python parts load
# (no benchmark runs here).
check_scripts() {
    local f
    for f in scripts/*.sh scripts/lib/*.sh bench/*.sh packaging/*.sh; do
        bash -n "$f" || return 1
    done
    bash bench/run.sh --help >/dev/null &&
        python3 bench/workloads.py --help >/dev/null &&
        python3 bench/report.py --help >/dev/null
}
step "scripts: bash -n, bench/run.sh --help" check_scripts
step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
step "cargo build" cargo build --workspace --bins
step "packaging/verify.sh" bash packaging/verify.sh "$repo/target/debug"
step "cargo test" cargo test --workspace --no-fail-fast -- --test-threads="$threads" "$@"

echo
echo "test.sh: all checks passed in $((SECONDS - started)) s"
