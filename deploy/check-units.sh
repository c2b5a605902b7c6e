#!/usr/bin/env bash
# Reviews the systemd units as CI does (the e2e test `security::the_systemd_units_pass_review`
# runs this): `systemd-analyze verify` must print nothing (it only warns, with exit status 0,
# about a setting it cannot parse), and `systemd-analyze security --offline=yes` must rate each
# unit at or under its ceiling: 2.5 for the provider and the site, 6.0 for the agent, which
# installs software as root (deploy/updraft-agent.service says what it keeps and why).
# The units name /usr/local/bin; they are checked against the binaries in UPDRAFT_BIN_DIR
# (default: target/debug), which must be built.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${UPDRAFT_BIN_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/debug}"
command -v systemd-analyze >/dev/null || { echo "systemd-analyze is missing: apt-get install systemd" >&2; exit 2; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for unit in deploy/*.service; do
  sed "s|/usr/local/bin/|$bin/|" "$unit" > "$tmp/$(basename "$unit")"
done
cd "$tmp"
out="$(systemd-analyze verify ./*.service 2>&1)" || true
if [ -n "$out" ]; then
  echo "systemd-analyze verify:"; echo "$out"; exit 1
fi
status=0
for pair in updraft-provider.service:25 updraft-remote-provider.service:25 updraft-agent.service:60; do
  unit="${pair%%:*}" ceiling="${pair##*:}"
  if report="$(systemd-analyze security --offline=yes --threshold="$ceiling" "$unit" 2>&1)"; then
    echo "$(echo "$report" | tail -1) (ceiling $((ceiling / 10)).$((ceiling % 10)))"
  else
    echo "$report" | grep -E '✗|Overall' ; echo "$unit is rated above its ceiling $((ceiling / 10)).$((ceiling % 10))"; status=1
  fi
done
exit $status
