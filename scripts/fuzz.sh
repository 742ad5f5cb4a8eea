#!/usr/bin/env bash
# A long run of the fuzz targets: the property tests named `fuzz_` in
# keibi-syncd (the peer channel's frame decoder and opener in
# syncd/src/channel/fuzz.rs, and the peer message decoder in
# syncd/src/peer/). They feed random and mutated input to the decoders
# and check that nothing panics, no buffer grows past its cap, and only
# authentic, well-formed input is accepted. The ordinary test run
# (scripts/test.sh, CI) runs the same tests with small case counts.
#
#   bash scripts/fuzz.sh [CASES]     (default 100000 per test)
#
# Built in release mode (the crypto is slow in a debug build). Prints the
# case count of every fuzz test and the total; exits non-zero on the
# first failing case, which proptest prints minimised.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/packages.sh
. "$repo/scripts/lib/packages.sh"

cases="${1:-100000}"
if ! [[ "$cases" =~ ^[1-9][0-9]*$ ]]; then
    echo "fuzz.sh: CASES must be a positive number, not '$cases'" >&2
    exit 2
fi
find_cargo
cd "$repo"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
start=$(date +%s)
PROPTEST_CASES="$cases" cargo test -p keibi-syncd --release fuzz_ -- --nocapture --test-threads=2 2>&1 | tee "$log"
end=$(date +%s)
# The filter selects only fuzz_ tests, so the passed count is theirs.
tests=$(sed -nE 's/^test result: ok\. ([0-9]+) passed.*/\1/p' "$log" | awk '{s += $1} END {print s + 0}')
if [ "$tests" -eq 0 ]; then
    echo "fuzz.sh: no fuzz test ran" >&2
    exit 1
fi
echo "fuzz.sh: fuzz tests run:"
grep -oE 'fuzz_[a-z0-9_]+' "$log" | sort -u | sed 's/^/  /'
echo "fuzz.sh: $tests fuzz tests x $cases cases = $((tests * cases)) cases, no failure, $((end - start)) s"
