#!/usr/bin/env bash
# How long keygate's last usage flush takes: loads N keys into a fresh Redis, starts keygate
# (the harness's configuration, usage flushed only at shutdown) and the harness's upstream,
# looks every key up once with wrk (a shuffled walk), then sends SIGTERM and prints the seconds
# until the process exits — the drain plus one flush of N keys' counts — and Redis's EVALSHA
# stats (the key loader's creates included: one run each). The flush's effect on the lookups
# around it is the harness's cold fixed-rate contender (docs/benchmarks.md, "Usage flushes and
# the miss path"). The keys' usage hashes are counted (Redis DBSIZE before and after): N when
# the flush wrote them all.
#
#   bash benches/load/usage_flush.sh target/release/keygate 100000
#
# Needs what benches/load/instructions.sh needs (nginx, redis-server, wrk, curl, bc, the key
# loader at LOAD_KEYS_BIN or target/release/examples/load_keys). Ports 18790-18799 on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { sed -n 2,12p "$0"; exit 2; }
BIN="$1"; N="${2:-100000}"
LOADER="${LOAD_KEYS_BIN:-target/release/examples/load_keys}"
for bin in nginx redis-server wrk curl bc; do
  command -v "$bin" >/dev/null || { echo "missing $bin" >&2; exit 1; }
done
[ -x "$LOADER" ] || { echo "no key loader at $LOADER (cargo build --release --example load_keys)" >&2; exit 1; }
UP=18798; UP_H2=18797; REDIS=18799; KG=18790; ADMIN=18791
OUT="$(mktemp -d /tmp/keygate-flush-XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$OUT"
}
trap cleanup EXIT

. benches/load/lib.sh

redis-server --bind 127.0.0.1 --port "$REDIS" --save '' --appendonly no --dir "$OUT" >"$OUT/redis.log" & PIDS+=($!)
sed -e "s|@UP@|$UP|g; s|@UP_H2@|$UP_H2|g; s|@RUN@|$OUT|g; s|@WORKERS@|1|g; s|@NGX_MODULES@|/usr/lib/nginx/modules|g" \
  benches/load/conf/upstream-nginx.conf > "$OUT/up.conf"
nginx -p "$OUT" -e "$OUT/up.err" -c "$OUT/up.conf" -g 'daemon off;' & PIDS+=($!)
wait_port "$REDIS"; wait_port "$UP"
"$LOADER" --redis "redis://127.0.0.1:$REDIS" --namespace kg --count "$N" --team bench --out "$OUT/keys.txt" >&2
sed -e "s|@PORT@|$KG|; s|@ADMIN@|$ADMIN|; s|@WORKERS@|1|; s|@REDIS@|$REDIS|; s|@NEG_TTL@|5|; s|@LOG_LEVEL@|warn|; s|@UP@|$UP|" \
  benches/load/conf/keygate.toml > "$OUT/keygate.toml"
printf '\n[usage]\nflush_interval = "1h"\n' >> "$OUT/keygate.toml"
"$BIN" serve --config "$OUT/keygate.toml" >"$OUT/keygate.log" 2>&1 & KP=$!
wait_port "$KG"; wait_port "$ADMIN"

lookups() { curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '/^keygate_auth_store_lookups_total /{printf "%d", $2}'; }
wrk -t1 -c32 -d300s -s benches/load/wrk/keys.lua "http://127.0.0.1:$KG/v1/x" -- \
  "$OUT/keys.txt" walk /v1/x none bearer keep 1 >"$OUT/wrk.txt" 2>&1 & WP=$!
seen=0
for _ in $(seq 1 3000); do
  seen=$(lookups); seen=${seen:-0}
  [ "$seen" -ge "$N" ] && break
  sleep 0.1
done
kill "$WP" 2>/dev/null || true
wait "$WP" 2>/dev/null || true
[ "$seen" -ge "$N" ] || { echo "only $seen of $N keys looked up" >&2; exit 1; }

before=$(redis-cli -p "$REDIS" dbsize)
t0=$(date +%s.%N)
kill -TERM "$KP"
wait "$KP" || true
t1=$(date +%s.%N)
after=$(redis-cli -p "$REDIS" dbsize)
# Each counted key's usage is a hash of its own, written by the flush.
echo "keys looked up: $seen; usage hashes written: $((after - before)); SIGTERM to exit: $(echo "$t1 - $t0" | bc) s"
redis-cli -p "$REDIS" info commandstats | grep -E '^cmdstat_evalsha' || true
