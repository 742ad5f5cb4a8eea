#!/usr/bin/env bash
# Run the crash loop test (tests/tests/crash_loop.rs) with a round count:
# a churn of atomic saves, creates, unlinks, renames, appends and fsynced
# files on a real keibi mount while keibi-syncd is killed with SIGKILL at a
# random moment and restarted (keibi-mountd too every fifth round). After
# every round every name must resolve, every directory list with `ls -l`,
# every file read fully, every fsynced file have exactly its bytes, and
# `keibictl check` find nothing.
#
#   sudo bash scripts/crash-loop.sh [ROUNDS]     (default 100, as in CI)
#
# Environment: KEIBI_CRASH_SEED replays a run (the test prints the seed it
# used); KEIBI_TEST_KEEP=1 keeps the fixture directory (logs, state) of a
# failed run. Needs root and /dev/fuse, like scripts/test.sh.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/packages.sh
. "$repo/scripts/lib/packages.sh"

rounds="${1:-100}"
if ! [[ "$rounds" =~ ^[1-9][0-9]*$ ]]; then
    echo "crash-loop.sh: ROUNDS must be a positive number, not '$rounds'" >&2
    exit 2
fi
require_root "the crash loop mounts a FUSE filesystem and runs keibi-syncd as another user"
find_cargo
cd "$repo"
cargo build --workspace --bins
KEIBI_CRASH_ROUNDS="$rounds" cargo test -p keibi-e2e --test crash_loop -- \
    --nocapture --test-threads=1 kill_9_of_syncd_under_churn
