#!/usr/bin/env bash
# A complete local Updraft fleet in a temporary directory, on embedded defaults: a provider
# holding the CA, a remote (site) provider and three agents that enroll with their own keys; a sample package built, signed, approved, deployed to
# the agents' group and installed (a second approved product that nobody has or is given stays
# off every machine); then v2 pushed with high priority, v3 rolled out in two waves gated on
# verified installs; ending with the machine list.
# Everything listens on 127.0.0.1 only. Ports: UPDRAFT_DEMO_PORT (default 18092) and the next.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --bins
BIN="$PWD/target/debug"
PORT="${UPDRAFT_DEMO_PORT:-18092}"
P="https://127.0.0.1:$PORT"
R="https://127.0.0.1:$((PORT + 1))"
DEMO="$(mktemp -d -t updraft-demo.XXXXXX)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; echo; echo "demo files kept in $DEMO (logs: *.log)"; }
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
# Mutual TLS, as in production: the provider and the administrator get certificates from the
# demo's CA on disk; the site and the agents enroll, keeping their keys to themselves.
tls() { echo --tls-ca pki/ca.crt --tls-cert "pki/$1.crt" --tls-key "pki/$1.key"; }
admin() { "$BIN/admin-cli" --provider "$P" $(tls ops) "$@"; }
wait_for() { for _ in $(seq 1 150); do if eval "$1"; then return 0; fi; sleep 0.1; done; echo "timed out: $1" >&2; exit 1; }

cd "$DEMO"
step "release key, and a private CA with certificates for the provider and the administrator"
"$BIN/admin-cli" key generate --out release
"$BIN/admin-cli" key generate --out catalog
"$BIN/admin-cli" pki init --dir pki
"$BIN/admin-cli" pki issue centre --role provider --dir pki
"$BIN/admin-cli" pki issue ops --role admin --dir pki

step "sample product 'hello', versions 1.0.0.0, 2.0.0.0 and 3.0.0.0 (each verified over 2 s); and 'tools' 1.0.0.0"
for v in 1.0.0.0 2.0.0.0 3.0.0.0; do
  mkdir -p "src-$v/bin"
  printf '#!/bin/sh\necho "hello from %s"\n' "$v" > "src-$v/bin/hello"; chmod 755 "src-$v/bin/hello"
  echo "$v" > "src-$v/VERSION"
  "$BIN/admin-cli" package build --product hello --version "$v" --from "src-$v" --key release.key --out "hello-$v.pkg" --release-label "Hello $v" --verify-window 2s
done
"$BIN/admin-cli" package build --product tools --version 1.0.0.0 --from src-1.0.0.0 --key release.key --out tools.pkg

step "provider on $P, remote provider 'branch-1' on $R"
"$BIN/provider" --store provider --listen "127.0.0.1:$PORT" --trust-key release.pub --name centre $(tls centre) --catalog-key catalog.key \
  --pki-dir pki --bootstrap-admin ops > provider.log 2>&1 & pids+=($!)
wait_for "admin update list >/dev/null 2>&1"
# The site enrolls with a join token: its key never leaves it; its certificate lands in site/tls.
"$BIN/remote-provider" enroll --upstream "$P" --ca pki/ca.crt --store site --name branch-1 \
  --token "$(admin pki token --role remote-provider --name branch-1 2>/dev/null)"
"$BIN/remote-provider" --upstream "$P" --store site --listen "127.0.0.1:$((PORT + 1))" --name branch-1 \
  > site.log 2>&1 & pids+=($!)

step "import hello v1 and tools, approve both (ga); deploy hello to the agents' group (default)"
V1=$(admin update add hello-1.0.0.0.pkg)
admin update state "$V1" ga
TOOLS=$(admin update add tools.pkg)
admin update state "$TOOLS" ga >/dev/null
admin deploy hello --group default
# The site answers its agents' checks from its replica: let it catch up first.
catalog_of() { "$BIN/admin-cli" --provider "$1" $(tls ops) --json site status 2>/dev/null | tr -d ' \n' | grep -o '"catalog_seq":[0-9]*' | cut -d: -f2; }
wait_for '[ -n "$(catalog_of "$R")" ] && [ "$(catalog_of "$R")" = "$(catalog_of "$P")" ]'

step "three agents enroll with one join token (pc-2 and pc-3 through branch-1), then run"
TOKEN=$(admin pki token --role agent --uses 3 --expires 1h 2>/dev/null)
for a in pc-1:$P pc-2:$R pc-3:$R; do
  name=${a%%:*}; url=${a#*:}
  "$BIN/agent" enroll --provider "$url" --ca pki/ca.crt --token "$TOKEN" --name "$name" --state-dir "$name/state"
  "$BIN/agent" run --provider "$url" --install-root "$name/apps" --state-dir "$name/state" --trust-key release.pub \
    --name "$name" --min-interval 3600 --catalog-key catalog.pub > "$name.log" 2>&1 & pids+=($!)
done
wait_for '[ "$(cat pc-*/apps/hello/VERSION 2>/dev/null | grep -cx 1.0.0.0)" = 3 ]'
"$BIN/agent" status --state-dir pc-2/state
echo "tools: approved, but no machine has or is given it: $(ls pc-*/apps | grep -c '^tools$' || true) installs"
pc-2/apps/hello/bin/hello

step "import v2, approve it and push it with high priority (agents otherwise check hourly)"
V2=$(admin update add hello-2.0.0.0.pkg)
admin update state "$V2" ga >/dev/null
start=$(date +%s%N)
admin update priority "$V2" high
wait_for '[ "$(cat pc-*/apps/hello/VERSION 2>/dev/null | grep -cx 2.0.0.0)" = 3 ]'
echo "all three agents on 2.0.0.0 $(( ($(date +%s%N) - start) / 1000000 )) ms after the push"
pc-3/apps/hello/bin/hello
ls pc-3/apps

step "roll v3 out in waves: wave 2 opens once wave 1's machines verified it (admin-cli rollout start)"
V3=$(admin update add hello-3.0.0.0.pkg)
admin rollout preview "$V3" --waves 50%,100%
admin rollout start "$V3" --waves 50%,100% --wave-wait 0s --min-verified 100%
for _ in $(seq 1 600); do [ "$(cat pc-*/apps/hello/VERSION 2>/dev/null | grep -cx 3.0.0.0)" = 3 ] && break; sleep 0.1; done
for _ in $(seq 1 600); do [ "$(admin --json rollout status "$V3" | tr -d ' \n' | grep -o '"verified":[0-9]*' | cut -d: -f2 | paste -sd+ | bc)" = 3 ] && break; sleep 0.1; done
admin rollout status "$V3"

step "machine list (as the centre sees it: site machines arrive through branch-1)"
wait_for '[ "$(admin machine list | grep -c 3.0.0.0)" = 3 ]'
admin machine list
step "recent activity"
admin activity --limit 6
step "certificates the provider issued (admin-cli pki list)"
admin pki list
