#!/usr/bin/env bash
# keygate load harness, the entry point: installs what it needs (as root, with apt: nginx with
# the Lua module, lua-nginx-redis, HAProxy, Redis, wrk, h2load), stops the system services those
# packages may have started (so nothing squats on ports or CPU), builds keygate and the key
# loader (examples/load_keys) in release mode, then runs benches/load/harness.py: every process
# on 127.0.0.1 (ports 18600-18642), the proxy pinned to core 0 and load/upstream/Redis to core 1,
# bounded in time, stopped on exit. Arguments go to harness.py (`--help` lists them; its
# docstring explains the method). Results: a table on stdout, and results.md, results.json and
# the raw tool output in --out (default /tmp/keygate-bench-DATE). Exit status 1 when a
# contender failed to start or failed its sanity check.
#
#   bash benches/load/run.sh --rounds 1 --dur 2 --warm 1 --cold-dur 2 --skip-mem   # smoke, ~4 min
#   bash benches/load/run.sh --only get-keepalive --rounds 1 --dur 3 --skip-mem     # one workload
#   bash benches/load/run.sh --skip-mem                  # 3 rounds x 10 s, all workloads, ~35 min
#   bash benches/load/run.sh                             # the same, then the memory phase with
#                                                        # 1 000 000 keys in Redis (~3 min more)
#   bash benches/load/run.sh --proxy-cores 4 --conns 128 --only get-keepalive --skip-mem  # 9+ cores
#   (a machine without apt: benches/load/bundle.sh packs everything; docs/benchmarks.md)
#
# KEYGATE_BIN and LOAD_KEYS_BIN, when both set, name prebuilt binaries and skip the build;
# otherwise they are built with cargo into ${CARGO_TARGET_DIR:-target}/release.
# --perf needs `perf` (linux-perf), which this script does not install; --perf-callers draws flame
# graphs when inferno is on PATH (cargo install inferno).
set -euo pipefail
cd "$(dirname "$0")/../.."

need_pkgs=()
command -v nginx >/dev/null || need_pkgs+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || need_pkgs+=(libnginx-mod-http-lua)
[ -e /usr/share/lua/5.1/nginx/redis.lua ] || need_pkgs+=(lua-nginx-redis)
command -v haproxy >/dev/null || need_pkgs+=(haproxy)
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v h2load >/dev/null || need_pkgs+=(nghttp2-client)
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
command -v redis-cli >/dev/null || need_pkgs+=(redis-tools)
command -v taskset >/dev/null || need_pkgs+=(util-linux)
command -v python3 >/dev/null || need_pkgs+=(python3)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "run.sh: installing ${need_pkgs[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "run.sh: missing packages: ${need_pkgs[*]} (run as root, or: sudo apt-get install ${need_pkgs[*]})" >&2
    exit 1
  fi
fi

# Debian starts these as services where an init system runs; the harness uses its own
# processes, ports and configuration files, so stop them.
if [ "$(id -u)" = 0 ]; then
  for svc in nginx haproxy redis-server prometheus; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
      systemctl stop "$svc" || true
    elif command -v service >/dev/null && service "$svc" status >/dev/null 2>&1; then
      service "$svc" stop >/dev/null 2>&1 || true
    fi
  done
fi

if [ -n "${KEYGATE_BIN:-}" ] && [ -n "${LOAD_KEYS_BIN:-}" ]; then
  echo "run.sh: using KEYGATE_BIN=$KEYGATE_BIN LOAD_KEYS_BIN=$LOAD_KEYS_BIN (no build)" >&2
else
  cargo build --release --locked --bin keygate --example load_keys
  target="${CARGO_TARGET_DIR:-target}"
  export KEYGATE_BIN="$target/release/keygate" LOAD_KEYS_BIN="$target/release/examples/load_keys"
fi
exec python3 benches/load/harness.py "$@"
