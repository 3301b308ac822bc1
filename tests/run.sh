#!/usr/bin/env bash
# The one test command (README, CI): makes sure redis-server is installed (the tests start
# their own instances on free loopback ports), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
    echo "redis-server is missing: install it (Debian/Ubuntu: apt-get install redis-server)" >&2
    exit 1
  fi
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing redis-server (the tests start their own instances)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  # The package may start a system instance on 6379; the tests do not use it.
  ($SUDO service redis-server stop || true) >/dev/null 2>&1
fi

cargo test --locked "$@"

# The admin API against its OpenAPI document (installs schemathesis in a venv under target/).
bash tests/schemathesis.sh
