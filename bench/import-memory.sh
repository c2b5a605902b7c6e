#!/usr/bin/env bash
# Measures the provider's peak memory (VmHWM) while importing packages of very different sizes
# through `admin-cli update add`, to show that an import's memory does not grow with the
# package. Release build, loopback only (plaintext: --insecure). Usage: bench/import-memory.sh
# [SIZES_MIB...]; CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bins
BIN="${CARGO_TARGET_DIR:-$PWD/target}/release"
SIZES=("${@:-64 2048}")
[ $# -gt 0 ] && SIZES=("$@") || SIZES=(64 2048)
W="$(mktemp -d -t updraft-bench.XXXXXX)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
cd "$W"
"$BIN/admin-cli" key generate --out k >/dev/null
printf '%-10s %-12s %-14s %-14s %s\n' "PACKAGE" "IMPORT" "RSS before" "PEAK RSS" "PEAK - BEFORE"
for mib in "${SIZES[@]}"; do
  rm -rf src "p$mib" && mkdir src
  head -c $((mib * 1024 * 1024)) /dev/urandom > src/payload.bin
  "$BIN/admin-cli" package build --product big$mib --version 1.0.0.0 --from src --key k.key --out "big$mib.pkg" >/dev/null
  rm -rf src
  port=$((19000 + mib % 1000))
  "$BIN/provider" --insecure --store "p$mib" --listen 127.0.0.1:$port --trust-key k.pub >"p$mib.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do "$BIN/admin-cli" --insecure --provider http://127.0.0.1:$port update list >/dev/null 2>&1 && break; sleep 0.1; done
  before=$(awk '/VmRSS/{print $2}' /proc/$pid/status)
  t0=$(date +%s%N)
  "$BIN/admin-cli" --insecure --provider http://127.0.0.1:$port update add "big$mib.pkg" >/dev/null 2>"add$mib.err" \
    || { echo "import of big$mib.pkg failed:" >&2; cat "add$mib.err" "p$mib.log" >&2; exit 1; }
  t1=$(date +%s%N)
  peak=$(awk '/VmHWM/{print $2}' /proc/$pid/status)
  printf '%-10s %-12s %-14s %-14s %s\n' "${mib} MiB" "$(( (t1 - t0) / 1000000 ))ms" "${before} kB" "${peak} kB" "$((peak - before)) kB"
  kill $pid; wait $pid 2>/dev/null || true
  rm -rf "big$mib.pkg" "p$mib"
done
