#!/usr/bin/env bash
# Set up and run relay on this machine: a virtualenv with relay installed, a config
# (relay.yaml, written once), an embedded SQLite database and a self-signed certificate
# under ./var, a first account (its password printed once), then `relay serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/relay ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e .
fi
CFG=${RELAY_CONFIG:-relay.yaml}
.venv/bin/relay -c "$CFG" init --data-dir var
exec .venv/bin/relay -c "$CFG" serve
