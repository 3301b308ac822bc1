#!/usr/bin/env bash
# Fuzzes the admin API against its OpenAPI document (docs/openapi.yaml) with schemathesis:
# no server errors, every status and body as documented. Starts its own keygate (embedded store
# in a temporary directory, ephemeral ports) and stops it on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET="${CARGO_TARGET_DIR:-target}"
VENV="${KEYGATE_SCHEMATHESIS_VENV:-$TARGET/schemathesis-venv}"
if [ ! -x "$VENV/bin/schemathesis" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis>=4,<5"
fi

cargo build --locked --quiet
WORK="$(mktemp -d)"
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

cat > "$WORK/keygate.toml" <<TOML
[store]
kind = "embedded"
path = "$WORK/keys.db"
[admin]
team_key_limit = 50
[[scopes]]
name = "orders:read"
description = "Read orders"
[upstreams.none]
url = "http://127.0.0.1:9"
[[routes]]
path_prefix = "/"
upstream = "none"
TOML

TOKEN="schemathesis-bootstrap-token-$RANDOM$RANDOM"
: > "$WORK/out"   # exists before the background job's redirect, for the polling below
KEYGATE_ADMIN_TOKEN="$TOKEN" RUST_LOG=warn "$TARGET/debug/keygate" serve \
  --config "$WORK/keygate.toml" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 > "$WORK/out" &
PID=$!
for _ in $(seq 1 100); do
  ADMIN=$(sed -n 's/^keygate: admin listening on //p' "$WORK/out" || true)
  [ -n "$ADMIN" ] && break
  sleep 0.1
done
[ -n "$ADMIN" ] || { echo "keygate did not start"; cat "$WORK/out"; exit 1; }

"$VENV/bin/schemathesis" run docs/openapi.yaml \
  --url "$ADMIN" \
  --header "Authorization: Bearer $TOKEN" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-40}" \
  --seed 1 \
  --no-color
