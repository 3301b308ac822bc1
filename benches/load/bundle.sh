#!/usr/bin/env bash
# Packs the load harness's programs into one self-contained folder, for a machine that has
# python3 but none of the packages and no way to install them (a lent benchmark machine, say):
# keygate and the key loader (release builds, debug info stripped, symbols kept for perf), and
# Debian's nginx (with its Lua module and Lua libraries), HAProxy, wrk, h2load, redis-server,
# redis-cli, taskset and (when installed here, for the harness's --perf) perf, each with every
# shared library it loads, the C library and its loader included, started through that loader
# so nothing on the other machine is used. Source DIR/env.sh there, then run the harness:
#
#   bash benches/load/bundle.sh .bench-bundle          # here, after run.sh installed and built
#   . .bench-bundle/env.sh && python3 benches/load/harness.py --proxy-cores 4 …   # there
#
# Same processor architecture only (x86-64 here). About 45 MiB, 70 with perf; `tar -czf` packs it
# to about a third, for a transfer that limits size (unpack it there with `tar -xzf`).
set -euo pipefail
[ $# -eq 1 ] || { sed -n 2,12p "$0"; exit 2; }
cd "$(dirname "$0")/../.."
dest=$(realpath -m "$1")
target="${CARGO_TARGET_DIR:-target}"
kg="${KEYGATE_BIN:-$target/release/keygate}"
loader="${LOAD_KEYS_BIN:-$target/release/examples/load_keys}"
for f in "$kg" "$loader" /usr/lib/nginx/modules/ngx_http_lua_module.so /usr/share/lua/5.1/nginx/redis.lua; do
  [ -e "$f" ] || { echo "bundle.sh: missing $f (run benches/load/run.sh --help first: it installs and builds)" >&2; exit 1; }
done

rm -rf "$dest"
mkdir -p "$dest/bin" "$dest/libexec" "$dest/lib" "$dest/nginx-modules"
strip --strip-debug -o "$dest/bin/keygate" "$kg"
strip -o "$dest/bin/load_keys" "$loader"
cp /usr/lib/nginx/modules/ndk_http_module.so /usr/lib/nginx/modules/ngx_http_lua_module.so "$dest/nginx-modules/"
cp -r /usr/share/lua/5.1 "$dest/lua"

libs() { ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'; }
objects=("$dest/nginx-modules/"*.so)
tools=(nginx haproxy wrk h2load redis-server redis-cli taskset)
command -v perf >/dev/null && tools+=(perf)
for tool in "${tools[@]}"; do
  real=$(readlink -f "$(command -v "$tool")")
  cp "$real" "$dest/libexec/$tool"
  objects+=("$real")
  # The bundle's own loader and C library, whatever the other machine has.
  cat >"$dest/bin/$tool" <<EOF
#!/bin/sh
d=\$(dirname "\$(dirname "\$(readlink -f "\$0")")")
exec "\$d/lib/ld-linux-x86-64.so.2" --library-path "\$d/lib" --argv0 $tool "\$d/libexec/$tool" "\$@"
EOF
  chmod +x "$dest/bin/$tool"
done
for o in "${objects[@]}"; do libs "$o"; done | sort -u | while read -r lib; do
  cp -L "$lib" "$dest/lib/$(basename "$lib")"
done
cat >"$dest/env.sh" <<'EOF'
# Source this: the harness then finds the bundle's programs.
kg_bundle=$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)
export PATH="$kg_bundle/bin:$PATH" KEYGATE_BIN="$kg_bundle/bin/keygate" LOAD_KEYS_BIN="$kg_bundle/bin/load_keys" \
  KEYGATE_BENCH_NGX_MODULES="$kg_bundle/nginx-modules" KEYGATE_BENCH_LUA_PATH="$kg_bundle/lua" \
  LUA_PATH="$kg_bundle/lua/?.lua;$kg_bundle/lua/?/init.lua;;"   # resty.core, which the Lua module loads first
EOF
echo "bundle.sh: $(du -sh "$dest" | cut -f1) in $dest" >&2
