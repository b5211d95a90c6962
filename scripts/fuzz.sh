#!/usr/bin/env bash
# Runs one cargo-fuzz target (fuzz/fuzz_targets/<target>.rs, see src/fuzzing.rs) on the nightly
# toolchain, installing cargo-fuzz first when it is missing. The corpus starts from the committed
# seeds (fuzz/seeds/<target>, made from tests/fixtures by scripts/fuzz_seeds.py) and grows in
# fuzz/corpus/<target>; crashes land in fuzz/artifacts/<target>.
#   scripts/fuzz.sh <target> [seconds]     e.g. scripts/fuzz.sh configs 300
#   scripts/fuzz.sh --list
# Targets are built without a sanitizer by default (SANITIZER=address to try ASan) and with debug
# assertions (overflow checks) on. libtorch is linked as for the main crate (.cargo/config.toml,
# fuzz/build.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "" ]; then
  echo "usage: scripts/fuzz.sh <target> [seconds] | --list" >&2
  exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz
fi
if [ "$1" = "--list" ]; then
  exec cargo +nightly fuzz list
fi
target=$1
seconds=${2:-300}
[ -e .libtorch ] || scripts/setup.sh
mkdir -p "fuzz/corpus/$target" "fuzz/seeds/$target"
# One libtorch thread: the fuzzer runs inputs one at a time.
export OMP_NUM_THREADS=1
exec cargo +nightly fuzz run --sanitizer "${SANITIZER:-none}" --debug-assertions "$target" \
  "fuzz/corpus/$target" "fuzz/seeds/$target" -- -max_total_time="$seconds" -rss_limit_mb=4096 \
  -timeout=20 -print_final_stats=1 "${@:3}"
