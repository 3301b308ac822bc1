#!/usr/bin/env bash
# Instructions per HTTP/2 request (h2c, prior knowledge), user space, counted by valgrind
# (callgrind): instructions.sh's measure for the HTTP/2 path, which it does not drive. One
# cached key on the harness's protected route, `h2load -n 20000 -c4 -m10` after 3 000 warm-up
# requests (counters zeroed after the warm-up), one proxy thread; prints, per binary, the
# requests answered and the instructions counted divided by them.
#
#   bash benches/load/instructions_h2.sh target/release/keygate
#   bash benches/load/instructions_h2.sh /tmp/keygate-before target/release/keygate   # A/B
#
# Needs: valgrind, nginx, redis-server, h2load (apt-get install valgrind nginx redis-server
# nghttp2-client), and the key loader (LOAD_KEYS_BIN, default
# target/release/examples/load_keys). Ports 18700-18711 on 127.0.0.1.
# Per-function costs: callgrind_annotate OUT/cg-<n>.out.1 (OUT is printed at the end).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { sed -n 2,13p "$0"; exit 2; }
for bin in valgrind callgrind_control nginx redis-server h2load; do
  command -v "$bin" >/dev/null || { echo "missing $bin (apt-get install valgrind nginx redis-server nghttp2-client)" >&2; exit 1; }
done
LOADER="${LOAD_KEYS_BIN:-target/release/examples/load_keys}"
[ -x "$LOADER" ] || { echo "no key loader at $LOADER (cargo build --release --example load_keys)" >&2; exit 1; }
REQUESTS="${REQUESTS:-20000}"
OUT=$(mktemp -d /tmp/keygate-h2instr-XXXX)
UP=18700 UP_H2=18701 REDIS=18702 KG=18710 ADMIN=18711
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
. benches/load/lib.sh

sed -e "s|@UP@|$UP|g; s|@UP_H2@|$UP_H2|g; s|@RUN@|$OUT|g; s|@WORKERS@|1|g; s|@NGX_MODULES@|/usr/lib/nginx/modules|g" \
  benches/load/conf/upstream-nginx.conf >"$OUT/up.conf"
nginx -p "$OUT" -e "$OUT/up.err" -c "$OUT/up.conf" -g 'daemon off;' &
PIDS+=($!)
redis-server --bind 127.0.0.1 --port "$REDIS" --save '' --appendonly no --dir "$OUT" >"$OUT/redis.log" &
PIDS+=($!)
wait_port "$UP"
wait_port "$REDIS"
"$LOADER" --redis "redis://127.0.0.1:$REDIS" --namespace kg --count 10 --team bench \
  --concurrency 4 --out "$OUT/hot.txt" 2>"$OUT/load.log"
KEY=$(head -1 "$OUT/hot.txt")
sed -e "s/@PORT@/$KG/; s/@ADMIN@/$ADMIN/; s/@REDIS@/$REDIS/; s/@UP@/$UP/; s/@NEG_TTL@/5/; s/@LOG_LEVEL@/warn/; s/@WORKERS@/1/" \
  benches/load/conf/keygate.toml >"$OUT/keygate.toml"

printf '%-40s %10s %16s %14s\n' binary requests instructions instr/request
i=0
for bin in "$@"; do
  i=$((i + 1))
  valgrind --tool=callgrind --callgrind-out-file="$OUT/cg-$i.out" --dump-instr=no \
    "$bin" serve --config "$OUT/keygate.toml" >"$OUT/kg-$i.log" 2>&1 &
  pid=$!
  wait_port "$KG"
  wait_port "$ADMIN"
  h2load -n 3000 -c4 -m10 -H "authorization: Bearer $KEY" "http://127.0.0.1:$KG/v1/resource" >/dev/null 2>&1
  callgrind_control -z "$pid" >/dev/null 2>&1
  n=$(h2load -n "$REQUESTS" -c4 -m10 -H "authorization: Bearer $KEY" "http://127.0.0.1:$KG/v1/resource" 2>&1 |
    awk '/^requests:/ {print $8}')
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  ir=$(grep -h '^summary:\|^totals:' "$OUT/cg-$i.out.1" | head -1 | awk '{print $2}')
  [ "${n:-0}" -gt 0 ] || { echo "$bin: no request succeeded (see $OUT/kg-$i.log)" >&2; exit 1; }
  printf '%-40s %10s %16s %14s\n' "$bin" "$n" "$ir" "$((ir / n))"
done
echo "callgrind outputs in $OUT"
