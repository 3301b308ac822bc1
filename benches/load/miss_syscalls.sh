#!/usr/bin/env bash
# System calls, context switches and CPU per cache miss, for keygate with W proxy threads: a
# measure of cross-thread wake-ups (each one an eventfd `write` by the waking thread and an
# `epoll_wait` return on the woken one) that the harness's throughput cannot resolve on 2 cores.
# Starts Redis, the harness's upstream nginx and keygate (its harness config) on loopback,
# loads N keys, then ROUNDS times: a fresh keygate, a warm-up on the public route, and DUR
# seconds of `wrk -t2 -c32` walking a third of the keys (each key once: every request a miss,
# one Redis GET) under `perf stat -p`. Prints per round: requests, store lookups, proxy CPU µs
# and the counts per request.
#
#   W=2 bash benches/load/miss_syscalls.sh [BINARY...]      # default target/release/keygate
#   N=150000 DUR=1 ROUNDS=3 W=1 …                           # the defaults, except W=2
#
# Needs perf, nginx, redis-server, wrk and the key loader (run.sh installs and builds them).
# DUR × the miss rate must stay under N / ROUNDS, or the walk comes round to cached keys (the
# script warns). Ports 18800-18811.
set -uo pipefail
cd "$(dirname "$0")/../.."
W=${W:-2}; N=${N:-150000}; DUR=${DUR:-1}; ROUNDS=${ROUNDS:-3}
LOADER="${LOAD_KEYS_BIN:-target/release/examples/load_keys}"
bins=("${@:-target/release/keygate}")
OUT=$(mktemp -d /tmp/keygate-misses-XXXXXX)
UP=18800; UP_H2=18801; REDIS=18802; KG=18810; ADMIN=18811
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
. benches/load/lib.sh
sed -e "s|@UP@|$UP|g; s|@UP_H2@|$UP_H2|g; s|@RUN@|$OUT|g; s|@WORKERS@|1|g; s|@NGX_MODULES@|/usr/lib/nginx/modules|g" \
  benches/load/conf/upstream-nginx.conf >"$OUT/up.conf"
nginx -p "$OUT" -e "$OUT/up.err" -c "$OUT/up.conf" -g 'daemon off;' & PIDS+=($!)
redis-server --bind 127.0.0.1 --port "$REDIS" --save '' --appendonly no --dir "$OUT" >"$OUT/redis.log" & PIDS+=($!)
wait_port $UP && wait_port $REDIS || exit 1
"$LOADER" --redis "redis://127.0.0.1:$REDIS" --namespace kg --count "$N" --team bench \
  --concurrency 64 --out "$OUT/keys.txt" 2>"$OUT/load.log" || { cat "$OUT/load.log" >&2; exit 1; }
sed -e "s/@PORT@/$KG/; s/@ADMIN@/$ADMIN/; s/@REDIS@/$REDIS/; s/@UP@/$UP/; s/@NEG_TTL@/5/; s/@LOG_LEVEL@/warn/; s/@WORKERS@/$W/" \
  benches/load/conf/keygate.toml >"$OUT/keygate.toml"
events=task-clock,context-switches,syscalls:sys_enter_write,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_writev,syscalls:sys_enter_recvfrom,raw_syscalls:sys_enter
third=$(( N / ROUNDS ))
for round in $(seq 1 "$ROUNDS"); do
  head -n $(( third * round )) "$OUT/keys.txt" | tail -n "$third" >"$OUT/walk.txt"
  for bin in "${bins[@]}"; do
    "$bin" serve --config "$OUT/keygate.toml" >"$OUT/kg.log" 2>&1 & pid=$!
    wait_port $KG && wait_port $ADMIN || exit 1
    wrk -t2 -c16 -d1s -s benches/load/wrk/keys.lua "http://127.0.0.1:$KG/public/v1/resource" -- \
      - random /public/v1/resource none none keep >/dev/null 2>&1
    perf stat -x, -o "$OUT/stat.txt" -e "$events" -p $pid -- sleep "$DUR" & sp=$!
    sent=$(wrk -t2 -c32 -d"${DUR}s" -s benches/load/wrk/keys.lua "http://127.0.0.1:$KG/v1/resource" -- \
      "$OUT/walk.txt" walk /v1/resource none bearer keep 2 2>/dev/null | awk '/requests in/ {print $1}')
    wait $sp
    lookups=$(curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '/^keygate_auth_store_lookups_total / {print $2}')
    kill $pid; wait $pid 2>/dev/null
    [ "${sent:-0}" -le "$third" ] || echo "warning: $sent requests walked past $third keys (cache hits)" >&2
    printf '%s W=%s round %s: %s requests, %s lookups;' "$bin" "$W" "$round" "$sent" "$lookups"
    awk -F, -v n="$sent" '$1 ~ /^[0-9.]+$/ {
      name = $3; sub(/^(raw_)?syscalls:sys_enter_?/, "", name); if (name == "") name = "syscalls"
      if ($3 == "task-clock") printf " cpu_us=%.2f", $1 * 1000 / n; else printf " %s=%.2f", name, $1 / n
    } END { print "" }' "$OUT/stat.txt"
  done
done
