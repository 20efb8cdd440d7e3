#!/usr/bin/env bash
# Install what is missing and run the whole test suite (lint, then pytest).
# Extra arguments go to pytest, e.g. scripts/test.sh -k presence
set -euo pipefail
EXTRAS=dev source "$(dirname "$0")/setup.sh"

echo "==> ruff check"
.venv/bin/ruff check .
echo "==> pytest"
exec .venv/bin/python -m pytest -q -rs --durations=20 "$@"
