#!/usr/bin/env bash
# Install what is missing, then run a fleet (SQLite + local broker) and one local agent.
set -euo pipefail
EXTRAS=fleet source "$(dirname "$0")/setup.sh"

export EDGEFLEET_DATA_DIR="${EDGEFLEET_DATA_DIR:-$ROOT/.edgefleet}"
exec .venv/bin/edge-fleet quickstart "$@"
