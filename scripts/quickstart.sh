#!/usr/bin/env bash
# Install what is missing, then run a fleet (SQLite + local broker) and one local agent.
set -euo pipefail
EXTRAS=fleet source "$(dirname "$0")/setup.sh"

exec .venv/bin/edge-fleet quickstart "$@"
