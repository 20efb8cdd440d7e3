# Sourced by quickstart.sh and test.sh: install what is missing, then the project in .venv.
# Usage: EXTRAS=fleet,agent source scripts/setup.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_missing=()
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
  apt_missing+=(python3 python3-venv python3-pip)
elif ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  apt_missing+=(python3-venv)
fi
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  apt_missing+=(mosquitto)
fi
# mosquitto_rr: deploy/mosquitto/add-account.sh manages broker accounts with it (the test
# brokers run that script too).
if ! command -v mosquitto_rr >/dev/null 2>&1; then
  apt_missing+=(mosquitto-clients)
fi
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "==> installing system packages: ${apt_missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: edgefleet needs Python >= 3.11; $PY is $("$PY" --version 2>&1)" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
EXTRAS="${EXTRAS:-dev}"
echo "==> installing edgefleet[${EXTRAS}] into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${EXTRAS}]" \
  2>&1 | { grep -v -E "^WARNING: Location .* is ignored" || true; }
