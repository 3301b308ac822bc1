#!/usr/bin/env bash
# A quick single-round load comparison on loopback (not the full harness of the benchmarks
# issue): nginx fixed-200 upstream, Redis, and keygate (release build) in front of it.
# keygate is pinned to core 0 with one worker thread; wrk, nginx and Redis share core 1.
# Prints requests/s, latency percentiles and keygate's CPU time per request for:
# direct upstream, keygate public route (no auth), keygate with a cached valid key,
# keygate with a well-formed unknown key (negative cache), keygate with a malformed key.
# Usage: bash benches/load/smoke.sh [seconds per run, default 5]
set -euo pipefail
cd "$(dirname "$0")/../.."
DUR="${1:-5}"
for bin in nginx wrk redis-server; do
  command -v "$bin" >/dev/null || { echo "missing $bin (apt-get install nginx wrk redis-server)"; exit 1; }
done
cargo build --release --locked --quiet
KG="${CARGO_TARGET_DIR:-target}/release/keygate"
RUN="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; nginx -p "$RUN" -c "$RUN/up.conf" -s stop 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$RUN"; }
trap cleanup EXIT

UP=18580; RP=18581; GW=18582; AD=18583
cat > "$RUN/up.conf" <<NGX
worker_processes 1;
pid $RUN/up.pid;
error_log $RUN/up.err warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path $RUN/b; proxy_temp_path $RUN/p; fastcgi_temp_path $RUN/f; uwsgi_temp_path $RUN/u; scgi_temp_path $RUN/s;
  default_type application/json;
  server {
    listen 127.0.0.1:$UP reuseport backlog=4096;
    location / { return 200 '{"ok":true,"service":"upstream","msg":"hello from upstream"}\n'; }
  }
}
NGX
taskset -c 1 nginx -p "$RUN" -c "$RUN/up.conf"
taskset -c 1 redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no --daemonize no > "$RUN/redis.log" 2>&1 &
PIDS+=($!)
cat > "$RUN/kg.toml" <<TOML
[proxy]
listen = "127.0.0.1:$GW"
[admin]
listen = "127.0.0.1:$AD"
[store]
kind = "redis"
redis_url = "redis://127.0.0.1:$RP"
[cache]
ttl = "10m"
[log]
level = "warn"
[upstreams.up]
url = "http://127.0.0.1:$UP"
[[routes]]
name = "public"
path_prefix = "/public"
upstream = "up"
public = true
[[routes]]
name = "api"
path_prefix = "/"
upstream = "up"
TOML
for _ in $(seq 1 50); do redis-cli -p "$RP" ping >/dev/null 2>&1 && break; sleep 0.1; done
KEY=$("$KG" keys --config "$RUN/kg.toml" create --team bench 2>/dev/null)
TOKIO_WORKER_THREADS=1 taskset -c 0 "$KG" serve --config "$RUN/kg.toml" > "$RUN/kg.out" 2>&1 &
KGPID=$!
PIDS+=($KGPID)
for _ in $(seq 1 100); do grep -q "proxy listening" "$RUN/kg.out" && break; sleep 0.1; done
UNKNOWN=$("$KG" keys --config "$RUN/kg.toml" create --team other 2>/dev/null)
# Revoke it so it is well-formed and unknown: the negative-cache path.
ID=$("$KG" keys --config "$RUN/kg.toml" list --team other --json | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["api_key_id"])')
"$KG" keys --config "$RUN/kg.toml" revoke "$ID" >/dev/null

cpu_ticks() { awk '{print $14+$15}' "/proc/$KGPID/stat"; }
HZ=$(getconf CLK_TCK)
printf "%-26s %10s %9s %9s %9s %12s\n" scenario "req/s" p50 p99 p99.9 "gw CPU us/req"
run() {
  local name="$1" url="$2"; shift 2
  local t0; t0=$(cpu_ticks)
  local out; out=$(taskset -c 1 wrk -t1 -c50 -d"${DUR}s" --latency "$@" "$url")
  local t1; t1=$(cpu_ticks)
  local rps; rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  local reqs; reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  local p50 p99 p999
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  p999=$(echo "$out" | awk '$1=="99.900%" || $1=="99.9%" {print $2}')
  local cpu="-"
  if [ "$name" != "direct" ] && [ -n "$reqs" ] && [ "$reqs" -gt 0 ]; then
    cpu=$(python3 -c "print(round(($t1-$t0)/$HZ*1e6/$reqs,1))")
  fi
  printf "%-26s %10s %9s %9s %9s %12s\n" "$name" "$rps" "$p50" "$p99" "${p999:--}" "$cpu"
}
run direct "http://127.0.0.1:$UP/"
run keygate-public "http://127.0.0.1:$GW/public/x"
run keygate-cached-key "http://127.0.0.1:$GW/x" -H "Authorization: Bearer $KEY"
run keygate-unknown-key "http://127.0.0.1:$GW/x" -H "Authorization: Bearer $UNKNOWN"
run keygate-malformed-key "http://127.0.0.1:$GW/x" -H "Authorization: Bearer kg_thisisnotakey"
