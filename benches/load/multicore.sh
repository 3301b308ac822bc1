#!/usr/bin/env bash
# The harness at several proxy core counts in one go, for a machine lent for a few minutes
# (the 16-core runs in docs/benchmarks.md were made this way, by hand). Short runs: 3 rounds of
# 4 s, get-keepalive, the contenders that tell scaling apart; each core count's results.md is
# copied to OUT/N-cores.md and its log to OUT/N-cores.log (8 files at most for 4 counts).
#
#   bash benches/load/multicore.sh OUT [N ...]        # default N: 1 4 7
#
# Uses .bench-bundle (benches/load/bundle.sh) when it is there, else what run.sh installed and
# built. KEYGATE_BIN_B works as in harness.py (an A/B of two builds in the same rounds).
# About 80 s per core count with the default contenders (more with KEYGATE_BIN_B).
set -uo pipefail
[ $# -ge 1 ] || { sed -n 2,12p "$0"; exit 2; }
cd "$(dirname "$0")/../.."
out=$(realpath -m "$1")
shift
mkdir -p "$out"
[ -f .bench-bundle/env.sh ] && . .bench-bundle/env.sh
contenders=${CONTENDERS:-direct,keygate-public-bearer,keygate-cached,keygate-cold-100k,nginx-map,haproxy-map,nginx-lua-redis-every}
if [ -n "${KEYGATE_BIN_B:-}" ]; then
  contenders="$contenders,$(tr ',' '\n' <<<"$contenders" | grep '^keygate' | sed 's/$/@B/' | paste -sd,)"
fi
status=0
for n in "${@:-1 4 7}"; do
  for cores in $n; do
    run=$(mktemp -d)
    echo "multicore.sh: --proxy-cores $cores" >&2
    PYTHONUNBUFFERED=1 python3 benches/load/harness.py --proxy-cores "$cores" --conns $((cores > 1 ? 32 * cores : 64)) \
      --rounds 3 --dur 4 --warm 1 --cold-dur 3 --skip-mem --only get-keepalive \
      --contenders "$contenders" --out "$run" >"$out/$cores-cores.log" 2>&1 || status=1
    cp "$run/results.md" "$out/$cores-cores.md" 2>/dev/null || status=1
    grep '^| get' "$out/$cores-cores.md" 2>/dev/null
    rm -rf "$run"
  done
done
exit $status
