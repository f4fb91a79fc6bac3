#!/usr/bin/env bash
# Long fuzzing run, for nightly jobs: scripts/fuzz-long.sh [SECONDS per target,
# default 3600]. See docs/FUZZING.md.
#
# With cargo-fuzz and a nightly toolchain: libFuzzer, coverage-guided, on the
# decode and handshake targets, one after the other. It starts from the
# committed corpus (fuzz/corpus/TARGET) and keeps what it learns in
# fuzz/target/corpus/TARGET (not committed: thousands of files); a crash is
# copied into fuzz/corpus/TARGET, where the stable driver replays it on every
# `cargo test`, and the script fails naming it.
#
# Otherwise: the stable driver (tests/fuzz, what `cargo test` runs for 60 s)
# built with optimizations, both targets side by side for the budget; a
# crash is written to fuzz/corpus/TARGET and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3600}
[[ $secs =~ ^[0-9]+$ ]] || { echo "usage: $0 [SECONDS per target]" >&2; exit 2; }

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz-long: no cargo-fuzz on a nightly toolchain (rustup toolchain install nightly; cargo install cargo-fuzz):" \
       "running the stable driver for ${secs}s per target" >&2
  NBDVIRT_FUZZ_SECONDS=$secs exec cargo test --release --locked --test fuzz -- --nocapture
fi

failed=()
for target in decode handshake; do
  work=fuzz/target/corpus/$target
  mkdir -p "$work" "fuzz/artifacts/$target"
  before=$(ls "fuzz/artifacts/$target" | wc -l)
  # -malloc_limit_mb: one allocation above 4 MiB is a bug (the stable driver
  # bounds what a case holds at once to the same 4 MiB).
  if ! cargo +nightly fuzz run "$target" "$work" "fuzz/corpus/$target" -- \
       -max_total_time="$secs" -malloc_limit_mb=4 -timeout=10; then
    failed+=("$target")
  fi
  if (( $(ls "fuzz/artifacts/$target" | wc -l) > before )); then
    for f in "fuzz/artifacts/$target"/*; do
      if [[ ! -e fuzz/corpus/$target/$(basename "$f") ]]; then
        cp "$f" "fuzz/corpus/$target/"
        echo "fuzz-long: $f copied to fuzz/corpus/$target/: commit it" >&2
      fi
    done
  fi
done
if ((${#failed[@]})); then
  echo "fuzz-long: failures in ${failed[*]} (inputs in fuzz/corpus/<target>/, also in fuzz/artifacts/)" >&2
  exit 1
fi
