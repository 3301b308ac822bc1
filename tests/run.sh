#!/usr/bin/env bash
# The one test command (README, CI): installs what the tests run that may be missing on a fresh
# Debian machine (redis-server: the tests start their own instances on free loopback ports;
# curl and Python requests: the body-key tests drive real clients), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO="none"; fi
fi
APT_UPDATED=""
# Installs Debian packages, running `apt-get update` once; fails (without exiting) when there
# is no root and no sudo.
apt_install() {
  if [ "$SUDO" = "none" ]; then
    echo "missing: $* (Debian/Ubuntu: apt-get install $*)" >&2
    return 1
  fi
  if [ -z "$APT_UPDATED" ]; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server (the tests start their own instances)"
  apt_install redis-server || exit 1
  # The package may start a system instance on 6379; the tests do not use it.
  ($SUDO service redis-server stop || true) >/dev/null 2>&1
fi

if ! command -v curl >/dev/null 2>&1; then
  echo "installing curl (tests/it/form.rs runs it)"
  apt_install curl || exit 1
fi

if ! python3 -c 'import requests' >/dev/null 2>&1; then
  echo "installing Python requests (tests/it/form.rs runs it)"
  apt_install python3 python3-requests || true
  if ! python3 -c 'import requests' >/dev/null 2>&1; then
    python3 -m pip install --quiet requests \
      || python3 -m pip install --quiet --break-system-packages requests
  fi
fi

if ! command -v promtool >/dev/null 2>&1; then
  echo "installing promtool (package prometheus; the metrics test lints /metrics with it)"
  apt_install --no-install-recommends prometheus || exit 1
  # The package starts a Prometheus server on 9090, keygate's default admin port.
  ($SUDO service prometheus stop || true) >/dev/null 2>&1
fi

cargo test --locked "$@"

# The admin API against its OpenAPI document (installs schemathesis in a venv under target/).
bash tests/schemathesis.sh

# Kubernetes manifests, dashboard and alert rules (installs kubernetes-validate in a venv).
bash deploy/check.sh
