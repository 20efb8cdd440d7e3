#!/usr/bin/env bash
# Install what is missing and run the whole test suite (lint, then pytest).
# Extra arguments go to pytest, e.g. scripts/test.sh -k presence
set -euo pipefail
EXTRAS=dev source "$(dirname "$0")/setup.sh"

echo "==> ruff check"
.venv/bin/ruff check .
# Two processes for the suite (its end-to-end tests mostly wait on brokers, fleets and
# agents), then the few tests marked `solo` alone: they measure latency ratios that a
# neighbour's load would compress. Exit code 5 (nothing collected, e.g. under -k) is fine.
status=0
echo "==> pytest (2 processes)"
.venv/bin/python -m pytest -q -rs --durations=20 -n 2 -m "not solo" "$@" || status=$?
[ "$status" = 5 ] && status=0
echo "==> pytest (solo)"
solo=0
.venv/bin/python -m pytest -q -rs --durations=5 -m solo "$@" || solo=$?
[ "$solo" = 5 ] && solo=0
[ "$status" != 0 ] || status=$solo
exit "$status"
