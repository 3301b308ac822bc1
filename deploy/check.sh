#!/usr/bin/env bash
# Offline checks of everything under deploy/ (run by tests/run.sh, so by CI):
#  1. every Kubernetes manifest against the official schemas (kubernetes-validate, strict);
#     custom resources without a bundled schema (ServiceMonitor) get a structural check;
#  2. the keygate TOML inside every ConfigMap passes `keygate check-config`;
#  3. `promtool check rules` on the alert rules;
#  4. every metric name in the dashboard and the alert rules is exported by a live keygate.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET="${CARGO_TARGET_DIR:-target}"
VENV="$TARGET/deploy-venv"
K8S_VERSION=1.30.0
if [ ! -x "$VENV/bin/kubernetes-validate" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate>=1.30" pyyaml
fi
command -v promtool >/dev/null || { echo "promtool missing (Debian package prometheus)"; exit 1; }
cargo build --locked --quiet
KEYGATE="$TARGET/debug/keygate"

WORK="$(mktemp -d)"
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

echo "== Kubernetes schemas ($K8S_VERSION, strict)"
MANIFESTS=$(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
# shellcheck disable=SC2086
"$VENV/bin/kubernetes-validate" -k "$K8S_VERSION" --strict --quiet $MANIFESTS

echo "== structure of custom resources, kustomizations, ConfigMap TOML extraction"
"$VENV/bin/python" - "$WORK" <<'PY'
import os, sys, yaml, glob
work = sys.argv[1]
problems = []
n = 0
for path in sorted(glob.glob("deploy/kubernetes/**/*.yaml", recursive=True)):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    for d in docs:
        kind = d.get("kind")
        if kind == "ServiceMonitor":
            spec = d.get("spec", {})
            if not spec.get("selector", {}).get("matchLabels"):
                problems.append(f"{path}: ServiceMonitor without spec.selector.matchLabels")
            for ep in spec.get("endpoints", []) or [None]:
                if not ep or ep.get("path") != "/metrics" or not ep.get("port"):
                    problems.append(f"{path}: ServiceMonitor endpoint must name a port and path /metrics")
        if kind == "Kustomization":
            base = os.path.dirname(path)
            for r in d.get("resources", []):
                if not os.path.exists(os.path.join(base, r)):
                    problems.append(f"{path}: resource {r} does not exist")
        if kind == "ConfigMap":
            for key, text in (d.get("data") or {}).items():
                if key.endswith(".toml"):
                    n += 1
                    out = os.path.join(work, f"cm{n}.toml")
                    open(out, "w").write(text)
                    open(out + ".src", "w").write(f"{path} ({d['metadata']['name']}/{key})")
if problems:
    print("\n".join(problems)); sys.exit(1)
print(f"{n} keygate configuration(s) found in ConfigMaps")
PY

echo "== keygate check-config on the ConfigMaps"
for f in "$WORK"/cm*.toml; do
  echo "$(cat "$f.src")"
  "$KEYGATE" check-config "$f"
done

echo "== promtool check rules"
promtool check rules deploy/prometheus/alerts.yaml

echo "== metric names used by the dashboard and the alerts exist"
cat > "$WORK/k.toml" <<TOML
[store]
kind = "embedded"
path = "$WORK/k.db"
[upstreams.up]
url = "http://127.0.0.1:9"
[[routes]]
path_prefix = "/"
upstream = "up"
TOML
RUST_LOG=warn "$KEYGATE" serve --config "$WORK/k.toml" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 > "$WORK/out" &
PID=$!
for _ in $(seq 1 100); do
  PROXY=$(sed -n 's/^keygate: proxy listening on //p' "$WORK/out")
  ADMIN=$(sed -n 's/^keygate: admin listening on //p' "$WORK/out")
  [ -n "$PROXY" ] && [ -n "$ADMIN" ] && break
  sleep 0.1
done
[ -n "$ADMIN" ] || { echo "keygate did not start"; exit 1; }
# One refused and one upstream-failing request, so the labelled series exist.
curl -s -o /dev/null "$PROXY/x" || true
"$KEYGATE" keys --config "$WORK/k.toml" create > "$WORK/key" 2>/dev/null
curl -s -o /dev/null -H "Authorization: Bearer $(cat "$WORK/key")" "$PROXY/x" || true
curl -s "$ADMIN/metrics" > "$WORK/metrics"
"$VENV/bin/python" - "$WORK/metrics" <<'PY'
import json, re, sys, yaml
exported = set()
for line in open(sys.argv[1]):
    if line and not line.startswith("#"):
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", line)
        if m:
            exported.add(m.group(1))
exprs = []
dash = json.load(open("deploy/grafana/keygate.json"))
for p in dash["panels"]:
    exprs += [t["expr"] for t in p.get("targets", [])]
exprs += [v.get("query", "") for v in dash.get("templating", {}).get("list", []) if isinstance(v.get("query"), str)]
for g in yaml.safe_load(open("deploy/prometheus/alerts.yaml"))["groups"]:
    exprs += [r["expr"] for r in g["rules"]]
used = set()
for e in exprs:
    used |= {n for n in re.findall(r"\b(keygate_[a-z0-9_]+)", e)}
missing = sorted(used - exported)
if missing:
    print("metric names used but not exported:", ", ".join(missing)); sys.exit(1)
print(f"{len(used)} metric names used, all exported")
PY
echo "deploy checks: ok"
