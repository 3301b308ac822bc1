#!/usr/bin/env bash
# Instructions per request, user space, counted by valgrind (callgrind): a measure of keygate's
# own work that does not drift with the machine's load the way time does (the load harness's
# CPU µs/req moved 20-40 % between rounds on a busy VM, hiding 1-5 % changes). It cannot see
# kernel time (syscalls, TCP), so it complements the harness, it does not replace it.
#
# Starts Redis, the upstream nginx (fixed 200) and each given keygate binary under callgrind
# on loopback, loads HOT keys once, sends REQUESTS requests per route with wrk (8 connections,
# keys at random, the harness's wrk script) after a warm-up, and prints, per binary and route,
# the instructions counted during the measured requests (counters zeroed after the warm-up)
# divided by the requests. With MISS=N (e.g. 20000) a third route, `miss`, loads N more keys
# and walks them, each once, on a warm process: every counted request is a cache miss and one
# Redis GET (the script warns if fewer went to the store than were answered). With FORM=1 two
# more routes send the harness's 4 KiB multipart POST: `mp-bearer` (key in the header, the body
# not read) and `mp-form` (key only in the body's first field: the form peek). With H2=1 one
# more, `h2-cached`: h2c requests (prior knowledge) with one cached key, driven by h2load
# (`-c4 -m10`, 3 000 warm-up requests), the HTTP/2 path. With NEWCONN=1 one more, `newconn`:
# the cached key over a new connection per request (`Connection: close`), what accepting,
# setting up and closing a client connection adds.
#
#   bash benches/load/instructions.sh target/release/keygate                 # one binary
#   bash benches/load/instructions.sh /tmp/keygate-before target/release/keygate   # A/B
#
# Needs: valgrind, nginx with the Lua module, redis-server, wrk (apt-get install valgrind nginx
# libnginx-mod-http-lua redis-server wrk), with H2=1 h2load (nghttp2-client),
# and the key loader (LOAD_KEYS_BIN, default target/release/examples/load_keys; build it with
# `cargo build --release --example load_keys`). Ports 18700-18712 on 127.0.0.1.
# Per-function costs: callgrind_annotate OUT/cg-<n>-<route>.out (OUT is printed at the end).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { sed -n 2,27p "$0"; exit 2; }
for bin in valgrind nginx redis-server wrk curl; do
  command -v "$bin" >/dev/null || { echo "missing $bin (apt-get install valgrind nginx libnginx-mod-http-lua redis-server wrk curl)" >&2; exit 1; }
done
[ "${H2:-0}" = 0 ] || command -v h2load >/dev/null || { echo "missing h2load (apt-get install nghttp2-client)" >&2; exit 1; }
[ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || { echo "missing nginx's Lua module (apt-get install libnginx-mod-http-lua)" >&2; exit 1; }
LOADER="${LOAD_KEYS_BIN:-target/release/examples/load_keys}"
[ -x "$LOADER" ] || { echo "no key loader at $LOADER (cargo build --release --example load_keys)" >&2; exit 1; }
REQUESTS="${REQUESTS:-20000}"
HOT="${HOT:-1000}"
MISS="${MISS:-0}"
OUT="$(mktemp -d /tmp/keygate-instr-XXXXXX)"
UP=18700; UP_H2=18701; REDIS=18702; KG=18710; ADMIN=18711
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

. benches/load/lib.sh

# The load harness's upstream (same answers as in its runs).
sed -e "s|@UP@|$UP|g; s|@UP_H2@|$UP_H2|g; s|@RUN@|$OUT|g; s|@WORKERS@|1|g; s|@NGX_MODULES@|/usr/lib/nginx/modules|g" benches/load/conf/upstream-nginx.conf > "$OUT/up.conf"
nginx -p "$OUT" -e "$OUT/up.err" -c "$OUT/up.conf" -g 'daemon off;' & PIDS+=($!)
redis-server --bind 127.0.0.1 --port "$REDIS" --save '' --appendonly no --dir "$OUT" >"$OUT/redis.log" & PIDS+=($!)
wait_port "$UP"; wait_port "$REDIS"
"$LOADER" --redis "redis://127.0.0.1:$REDIS" --namespace kg --count "$HOT" --team bench \
  --concurrency 64 --out "$OUT/hot.txt" 2>"$OUT/load.log"
if [ "$MISS" -gt 0 ]; then
  "$LOADER" --redis "redis://127.0.0.1:$REDIS" --namespace kg --count "$MISS" --team bench-miss \
    --concurrency 64 --out "$OUT/miss.txt" 2>>"$OUT/load.log"
fi

sed -e "s/@PORT@/$KG/; s/@ADMIN@/$ADMIN/; s/@REDIS@/$REDIS/; s/@UP@/$UP/; s/@NEG_TTL@/5/; s/@LOG_LEVEL@/warn/; s/@WORKERS@/1/" \
  benches/load/conf/keygate.toml > "$OUT/keygate.toml"

store_lookups() {
  curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '/^keygate_auth_store_lookups_total / {print $2; f=1} END {if (!f) print 0}'
}

# A run: keygate under callgrind, about `requests` requests on `path`, the counters dumped
# after them. Prints the requests answered and the instructions counted.
run() { # binary tag path requests keyfile [miss] [body keyplace conn]
  local bin=$1 tag=$2 path=$3 n=$4 keyfile=$5 miss=${6:-} body=${7:-none} keyplace=${8:-bearer} conn=${9:-keep}
  valgrind --tool=callgrind --callgrind-out-file="$OUT/cg-$tag.out" --dump-instr=no \
    "$bin" serve --config "$OUT/keygate.toml" >"$OUT/kg-$tag.log" 2>&1 &
  local pid=$!
  wait_port "$KG"; wait_port "$ADMIN"
  # Warm: every key through the cache (a walk: each key once before any repeats; 3 s under
  # callgrind is well over HOT requests), the upstream pool filled.
  # The miss route warms on the public route instead: its keys must stay uncached.
  local h2key=""
  [ "$body" != h2 ] || h2key=$(head -1 "$keyfile")
  if [ -n "$h2key" ]; then
    h2load -n 3000 -c4 -m10 -H "authorization: Bearer $h2key" "http://127.0.0.1:$KG$path" >/dev/null 2>&1 || true
  elif [ -n "$miss" ]; then
    wrk -t1 -c8 -d3s -s benches/load/wrk/keys.lua "http://127.0.0.1:$KG/public/v1/resource" -- \
      - random /public/v1/resource none none keep >/dev/null 2>&1 || true
  elif [ "$n" -gt 0 ]; then
    wrk -t1 -c8 -d3s -s benches/load/wrk/keys.lua "http://127.0.0.1:$KG$path" -- \
      "$keyfile" walk "$path" "$body" "$keyplace" "$conn" >/dev/null 2>&1 || true
  fi
  # Start-up and warm-up are not counted.
  local lookups_before
  lookups_before=$(store_lookups)
  callgrind_control -z "$pid" >/dev/null 2>&1
  local sent=0
  if [ -n "$h2key" ]; then
    sent=$(h2load -n "$n" -c4 -m10 -H "authorization: Bearer $h2key" "http://127.0.0.1:$KG$path" 2>&1 |
      awk '/^requests:/ {print $8}')
  elif [ "$n" -gt 0 ]; then
    # Misses are slower under callgrind: a shorter run, so that the walk does not come round.
    local dur=$(( n / 1500 + 1 )) order=random
    [ -z "$miss" ] || { dur=$(( n / 4000 + 1 )); order=walk; }
    sent=$(wrk -t1 -c8 -d"${dur}s" -s benches/load/wrk/keys.lua "http://127.0.0.1:$KG$path" -- \
      "$keyfile" "$order" "$path" "$body" "$keyplace" "$conn" 2>/dev/null | awk '/requests in/ {print $1}')
  fi
  callgrind_control -d "$pid" >/dev/null 2>&1
  # A cached-route count is only a cache-hit count if no request went to the store.
  local lookups=$(( $(store_lookups) - lookups_before ))
  if [ -z "$miss" ]; then
    [ "$lookups" -eq 0 ] || echo "warning: $tag: $lookups store lookups while counting (cache misses)" >&2
  else
    [ "$lookups" -ge "$sent" ] || echo "warning: $tag: $lookups store lookups for $sent requests (some were cache hits)" >&2
  fi
  # What the shutdown costs after the dump is mostly the final usage flush: one count per key
  # used since start-up (on the miss route, one per request counted). Its instructions are in
  # the second callgrind part; Redis's CPU for it is read around the shutdown.
  local redis_cpu_before
  redis_cpu_before=$(redis_cpu_ms)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local ir flush_ir
  ir=$(grep -h '^summary:\|^totals:' "$OUT/cg-$tag.out.1" | head -1 | awk '{print $2}')
  flush_ir=$(grep -h '^summary:\|^totals:' "$OUT/cg-$tag.out" | head -1 | awk '{print $2}')
  echo "$sent $ir $flush_ir $(( $(redis_cpu_ms) - redis_cpu_before ))"
}

redis_cpu_ms() {
  redis-cli -p "$REDIS" info cpu | tr -d '\r' |
    awk -F: '/^used_cpu_(user|sys):/ {t += $2} END {printf "%d", t * 1000}'
}

printf '%-40s %-10s %10s %16s %12s\n' binary route requests instructions instr/request
i=0
flush_lines=()
for bin in "$@"; do
  i=$((i + 1))
  routes=(public:/public/v1/resource cached:/v1/resource)
  [ "$MISS" -eq 0 ] || routes+=(miss:/v1/resource)
  [ "${FORM:-0}" = 0 ] || routes+=(mp-bearer:/form mp-form:/form)
  [ "${H2:-0}" = 0 ] || routes+=(h2-cached:/v1/resource)
  [ "${NEWCONN:-0}" = 0 ] || routes+=(newconn:/v1/resource)
  for route in "${routes[@]}"; do
    name=${route%%:*}; path=${route#*:}
    if [ "$name" = miss ]; then
      read -r sent ir flush_ir flush_redis_ms < <(run "$bin" "$i-$name" "$path" "$MISS" "$OUT/miss.txt" miss)
    elif [ "$name" = mp-bearer ] || [ "$name" = mp-form ]; then
      local_place=both; [ "$name" = mp-form ] && local_place=form
      read -r sent ir flush_ir flush_redis_ms < <(run "$bin" "$i-$name" "$path" "$REQUESTS" "$OUT/hot.txt" "" multipart "$local_place")
    elif [ "$name" = newconn ]; then
      read -r sent ir flush_ir flush_redis_ms < <(run "$bin" "$i-$name" "$path" "$REQUESTS" "$OUT/hot.txt" "" none bearer close)
    elif [ "$name" = h2-cached ]; then
      read -r sent ir flush_ir flush_redis_ms < <(run "$bin" "$i-$name" "$path" "$REQUESTS" "$OUT/hot.txt" "" h2)
    else
      read -r sent ir flush_ir flush_redis_ms < <(run "$bin" "$i-$name" "$path" "$REQUESTS" "$OUT/hot.txt")
    fi
    printf '%-40s %-10s %10s %16s %12s\n' "$bin" "$name" "$sent" "$ir" \
      "$(awk -v i="$ir" -v n="$sent" 'BEGIN { if (n > 0) printf "%.0f", i / n; else print "-" }')"
    if [ "$name" = miss ]; then
      flush_lines+=("$(printf '%-40s %10s keys: %12s instructions (%s per key), Redis %s ms CPU' \
        "$bin" "$sent" "$flush_ir" \
        "$(awk -v i="$flush_ir" -v n="$sent" 'BEGIN { if (n > 0) printf "%.0f", i / n; else print "-" }')" \
        "$flush_redis_ms")")
    fi
  done
done
if [ ${#flush_lines[@]} -gt 0 ]; then
  echo "shutdown after the miss route (the final usage flush of the keys walked):"
  printf '%s\n' "${flush_lines[@]}"
fi
echo "callgrind outputs in $OUT"
