#!/usr/bin/env bash
# The cache-miss path's latency tail, request by request: loads N keys into a fresh Redis, then
# ROUNDS times per variant a fresh keygate (the harness's configuration, pinned to core 0)
# while 8 `h2load --h1` connections (core 1, with Redis and the upstream nginx) send RATE
# requests/s for DUR seconds, each request a new key (?api_key=, a shuffled walk: every request
# a miss). h2load's per-request logs give p50/p99/p99.9/max over the whole run and after its
# first 0.5 s (the start of h2load's 8 processes, each reading its URI list, on the core of
# the upstream and Redis: docs/benchmarks.md, "The first 0.15 s of a fixed-rate run"), and the
# stalls: groups of requests over 1 ms that started within 20 ms of each other, with their
# spacing. That is how
# the huge-page stalls were found (docs/benchmarks.md, "Huge pages"); the harness's cold
# fixed-rate contender gives only the percentiles.
#
#   bash benches/load/miss_tail.sh [BINARY...]        # default target/release/keygate
#   THP="false true" ROUNDS=2 bash benches/load/miss_tail.sh   # both proxy.transparent_huge_pages
#   THP= bash benches/load/miss_tail.sh OLD NEW        # builds without the setting: leave it unset
#
# Defaults: N=100000 RATE=5000 DUR=10 ROUNDS=2 THP=false USAGE=true (usage counting). Needs
# nginx, redis-server, h2load, taskset and the key loader (run.sh installs and builds them).
# Ports 18820-18831 on 127.0.0.1.
set -uo pipefail
cd "$(dirname "$0")/../.."
N=${N:-100000}; RATE=${RATE:-5000}; DUR=${DUR:-10}; ROUNDS=${ROUNDS:-2}
THP=${THP-false}; USAGE=${USAGE:-true}
LOADER="${LOAD_KEYS_BIN:-target/release/examples/load_keys}"
bins=("${@:-target/release/keygate}")
for tool in nginx redis-server h2load taskset; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
[ -x "$LOADER" ] || { echo "no key loader at $LOADER (cargo build --release --example load_keys)" >&2; exit 1; }
(( DUR * RATE <= N )) || { echo "DUR x RATE ($((DUR * RATE))) must not exceed N ($N): every request a new key" >&2; exit 2; }
OUT=$(mktemp -d /tmp/keygate-tail-XXXXXX)
UP=18820; UP_H2=18821; REDIS=18822; KG=18830; ADMIN=18831
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$OUT"; }
trap cleanup EXIT
. benches/load/lib.sh
sed -e "s|@UP@|$UP|g; s|@UP_H2@|$UP_H2|g; s|@RUN@|$OUT|g; s|@WORKERS@|1|g; s|@NGX_MODULES@|/usr/lib/nginx/modules|g" \
  benches/load/conf/upstream-nginx.conf >"$OUT/up.conf"
taskset -c 1 nginx -p "$OUT" -e "$OUT/up.err" -c "$OUT/up.conf" -g 'daemon off;' & PIDS+=($!)
taskset -c 1 redis-server --bind 127.0.0.1 --port "$REDIS" --save '' --appendonly no --dir "$OUT" >"$OUT/redis.log" & PIDS+=($!)
wait_port $UP && wait_port $REDIS || exit 1
"$LOADER" --redis "redis://127.0.0.1:$REDIS" --namespace kg --count "$N" --team bench \
  --concurrency 64 --out "$OUT/keys.txt" 2>"$OUT/load.log" || { cat "$OUT/load.log" >&2; exit 1; }
sed -e "s/@PORT@/$KG/; s/@ADMIN@/$ADMIN/; s/@REDIS@/$REDIS/; s/@UP@/$UP/; s/@NEG_TTL@/5/; s/@LOG_LEVEL@/warn/; s/@WORKERS@/1/" \
  benches/load/conf/keygate.toml >"$OUT/keygate.toml"
read -r -a modes <<<"${THP:-unset}"
per=$(( N / 8 ))

run() {  # run BINARY THP-MODE: one measured run, its summary on one line
  local bin=$1 mode=$2 envs=("KEYGATE__USAGE__ENABLED=$USAGE") hp=() i
  [ "$mode" = unset ] || envs+=("KEYGATE__PROXY__TRANSPARENT_HUGE_PAGES=$mode")
  env "${envs[@]}" taskset -c 0 "$bin" serve --config "$OUT/keygate.toml" >"$OUT/kg.log" 2>&1 & local pid=$!
  wait_port $KG && wait_port $ADMIN || { cat "$OUT/kg.log" >&2; exit 1; }
  shuf "$OUT/keys.txt" >"$OUT/order.txt"  # Redis holds every key; the cache starts empty
  rm -f "$OUT"/h2-*.log
  for i in $(seq 0 7); do
    sed -n "$(( i * per + 1 )),$(( (i + 1) * per ))p" "$OUT/order.txt" \
      | sed "s|^|http://127.0.0.1:$KG/q/v1/resource?api_key=|" >"$OUT/uris-$i.txt"
    taskset -c 1 h2load --h1 -t1 -c1 -m1 --rps $(( RATE / 8 )) -D "$DUR" --log-file "$OUT/h2-$i.log" \
      -i "$OUT/uris-$i.txt" >"$OUT/h2-$i.out" 2>&1 & hp+=($!)
  done
  wait "${hp[@]}"
  kill "$pid"; wait "$pid" 2>/dev/null
  printf '%s thp=%s: ' "$bin" "$mode"
  python3 - "$OUT" <<'PY'
import glob, sys
rows = []
for f in glob.glob(sys.argv[1] + "/h2-*.log"):
    for line in open(f):
        p = line.split()  # start (µs since the epoch), status, duration (µs)
        if len(p) >= 3:
            rows.append((int(p[0]), int(p[1]), int(p[2])))
rows.sort()
t0 = rows[0][0]
def pct(rs):
    lat = sorted(r[2] for r in rs)
    q = lambda x: lat[min(len(lat) - 1, int(x * len(lat)))]
    return f"p50 {q(.5)} p99 {q(.99)} p99.9 {q(.999)} max {lat[-1]} µs"
after = [r for r in rows if r[0] - t0 >= 500_000]
stalls = []  # [first start, last start, requests]
for start, _, dur in after:
    if dur > 1000:
        if stalls and start - stalls[-1][1] < 20_000:
            stalls[-1][1] = start; stalls[-1][2] += 1
        else:
            stalls.append([start, start, 1])
gaps = sorted(b[0] - a[0] for a, b in zip(stalls, stalls[1:]))
gap = f", median spacing {gaps[len(gaps) // 2] / 1e6:.3f} s" if gaps else ""
bad = sum(1 for r in rows if r[1] != 200)
print(f"{len(rows)} requests ({bad} not 200); all: {pct(rows)}; after 0.5 s: {pct(after)}; "
      f"{len(stalls)} stalls over 1 ms after 0.5 s ({sum(s[2] for s in stalls)} requests){gap}")
PY
}

for round in $(seq 1 "$ROUNDS"); do
  for bin in "${bins[@]}"; do
    for mode in "${modes[@]}"; do
      printf 'round %s, ' "$round"; run "$bin" "$mode"
    done
  done
done
