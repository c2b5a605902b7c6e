#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each) and prints executions and
# crashes per target. New interesting inputs go to a scratch corpus; crashes to
# fuzz/artifacts/TARGET/. Copy a crash into fuzz/corpus/TARGET/ once fixed: `cargo test`
# replays every corpus file.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). On a stable toolchain it runs with
# RUSTC_BOOTSTRAP=1, because the sanitizer flags cargo-fuzz passes are unstable options.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"; shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(package manifest version statement config control_request check_response)
export RUSTC_BOOTSTRAP=1
scratch="$(mktemp -d -t updraft-fuzz.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
printf '%-16s %12s %8s %s\n' TARGET EXECUTIONS CRASHES NOTE
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "fuzz/artifacts/$t"
  log="$scratch/$t.log"
  set +e
  cargo fuzz run --fuzz-dir fuzz -O "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 \
    -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  crashes=$(find "fuzz/artifacts/$t" -type f | wc -l)
  note=""; [ "$rc" = 0 ] || note="exit $rc, see $log"
  [ "$rc" = 0 ] || cp "$log" "fuzz/artifacts/$t/last-run.log"
  printf '%-16s %12s %8s %s\n' "$t" "${execs:-?}" "$crashes" "$note"
done
