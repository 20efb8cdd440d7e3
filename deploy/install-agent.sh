#!/usr/bin/env bash
# Install the edgefleet agent on a device, as a systemd service.
#
#   sudo deploy/install-agent.sh [--fleet URL --code CODE] [--source DIR|WHEEL]
#                                [--extra tflite] [--system-site-packages]
#                                [--pip-args "ARGS"] [--python PYTHON] [--root DIR]
#
# What it does, each step printed on one line, each one left as it is when already done
# (running it again changes only what must change: a new package, a changed unit):
#   user       system user `edgefleet` (no login shell, no home), unless it exists
#   venv       /opt/edgefleet/venv, with only the agent's extra: edgefleet[agent]
#              (--extra tflite adds a TFLite runtime), from --source: a source tree or a
#              wheel (default: the tree holding this script); reinstalled only when the
#              source, the extras or the pip arguments changed
#   state      /var/lib/edgefleet, 0700, owned by edgefleet
#   config     /etc/edgefleet/agent.toml, 0640 root:edgefleet: a commented default, written
#              only if there is none (never overwritten)
#   unit       /etc/systemd/system/edge-agent.service (from deploy/systemd/), then
#              daemon-reload + enable when systemd runs
#   enroll     with --fleet URL --code CODE (from `edge-fleet devices add NAME`), once:
#              `edge-agent enroll` as the edgefleet user; an enrolled device is left alone
#   service    started (or restarted when something changed) once enrolled, when systemd
#              runs; `systemctl start` returns when the agent says READY=1
#
# --root DIR installs into DIR instead of / (DIR/opt/edgefleet, DIR/var/lib/edgefleet,
# DIR/etc/edgefleet, DIR/etc/systemd/system): no user is made, no systemctl is run, nothing
# is chowned unless running as root and the edgefleet user exists, and enrollment runs as
# the calling user. The unit and the config name DIR's paths, so the install runs from DIR
# exactly as the unit's ExecStart says (a venv cannot be moved, so DIR is never an image
# to copy to / later). Tests install this way.
#
# --system-site-packages: the venv sees the system's packages (a vendor's onnxruntime
# build, say) and pip keeps what is already there. --pip-args "ARGS": extra arguments to
# `pip install` (--no-index --find-links DIR for an offline device, a mirror, ...).
# Exit codes: 0 installed, 1 a step failed (named), 2 invalid arguments.
set -Eeuo pipefail

AGENT_USER=edgefleet
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
UNIT_TEMPLATE="$SCRIPT_DIR/systemd/edge-agent.service"
UNIT_NAME=edge-agent.service

usage() { sed -n '2,/^set -E/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
bad_usage() { echo "install-agent: $1 (see --help)" >&2; exit 2; }
die() { echo "install-agent: error: $*" >&2; exit 1; }
say() { printf '%-8s %s\n' "$1" "$2"; }
STEP=arguments
trap 'echo "install-agent: step \"$STEP\" failed (exit $?)" >&2; exit 1' ERR

ROOT="" SOURCE="" FLEET="" CODE="" PYTHON=python3 SYSTEM_SITE=0 PIP_ARGS="" EXTRAS=(agent)
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --root|--source|--fleet|--code|--extra|--pip-args|--python)
      [ $# -ge 2 ] || bad_usage "$1 needs a value"
      case "$1" in
        --root) ROOT="$2" ;;
        --source) SOURCE="$2" ;;
        --fleet) FLEET="$2" ;;
        --code) CODE="$2" ;;
        --pip-args) PIP_ARGS="$2" ;;
        --python) PYTHON="$2" ;;
        --extra)
          [ "$2" = tflite ] || bad_usage "--extra $2: the only optional extra is tflite"
          [[ " ${EXTRAS[*]} " == *" tflite "* ]] || EXTRAS+=(tflite) ;;
      esac
      shift 2 ;;
    --system-site-packages) SYSTEM_SITE=1; shift ;;
    *) bad_usage "unknown argument: $1" ;;
  esac
done

if [ -n "$FLEET" ] || [ -n "$CODE" ]; then
  if [ -z "$FLEET" ] || [ -z "$CODE" ]; then bad_usage "--fleet and --code go together"; fi
  [[ "$FLEET" =~ ^https?://[^[:space:]]+$ ]] || bad_usage "--fleet $FLEET: expected http://HOST:PORT or https://..."
fi
if [ -n "$ROOT" ]; then
  mkdir -p "$ROOT" 2>/dev/null || bad_usage "--root $ROOT: cannot create it"
  ROOT="$(cd "$ROOT" && pwd -P)"
  # The paths go into the unit's ExecStart and the TOML config unquoted.
  [[ "$ROOT" =~ ^/[A-Za-z0-9._/+-]+$ ]] || bad_usage "--root $ROOT: use letters, digits and . _ - + / only"
  [ "$ROOT" != / ] || ROOT=""
fi
SOURCE="${SOURCE:-$(dirname "$SCRIPT_DIR")}"
if [ -d "$SOURCE" ]; then
  SOURCE="$(cd "$SOURCE" && pwd -P)"
  [ -f "$SOURCE/pyproject.toml" ] || bad_usage "--source $SOURCE: no pyproject.toml there"
elif [ -f "$SOURCE" ] && [[ "$SOURCE" == *.whl ]]; then
  SOURCE="$(cd "$(dirname "$SOURCE")" && pwd -P)/$(basename "$SOURCE")"
else
  bad_usage "--source $SOURCE: not a source tree or a .whl file"
fi
[ -f "$UNIT_TEMPLATE" ] || die "no unit file at $UNIT_TEMPLATE (run the script from its tree)"

AS_ROOT=0; [ "$(id -u)" = 0 ] && AS_ROOT=1
[ -n "$ROOT" ] || [ "$AS_ROOT" = 1 ] || die "run as root (sudo), or give --root DIR"
PREFIX="$ROOT/opt/edgefleet"
VENV="$PREFIX/venv"
STATE="$ROOT/var/lib/edgefleet"
ETC="$ROOT/etc/edgefleet"
CONFIG="$ETC/agent.toml"
UNIT_DIR="$ROOT/etc/systemd/system"
AGENT="$VENV/bin/edge-agent"
SYSTEMD=0; [ -z "$ROOT" ] && [ -d /run/systemd/system ] && SYSTEMD=1
CHANGED=0  # anything the running service must be restarted for

# Run a command as the agent's user (as the caller with --root, or when not root).
as_agent() {
  if [ -n "$ROOT" ] || [ "$AS_ROOT" = 0 ]; then "$@"
  elif command -v runuser >/dev/null; then runuser -u "$AGENT_USER" -- "$@"
  elif command -v setpriv >/dev/null; then
    setpriv --reuid="$AGENT_USER" --regid="$AGENT_USER" --init-groups -- "$@"
  else sudo -u "$AGENT_USER" -- "$@"
  fi
}

# ---------------------------------------------------------------- user
STEP=user
if [ -n "$ROOT" ]; then
  say user "--root: no user made (files stay the caller's unless $AGENT_USER exists)"
elif getent passwd "$AGENT_USER" >/dev/null; then
  say user "$AGENT_USER exists, kept"
else
  nologin="$(command -v nologin || echo /usr/sbin/nologin)"
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell "$nologin" --comment "edgefleet agent" "$AGENT_USER"
  say user "$AGENT_USER created (system user, no login shell, no home)"
fi
CHOWN=0
[ "$AS_ROOT" = 1 ] && getent passwd "$AGENT_USER" >/dev/null && CHOWN=1

# ---------------------------------------------------------------- venv + package
STEP=venv
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || die "$PYTHON is not Python 3.11 or newer (give --python PYTHON)"
mkdir -p "$PREFIX"
if [ -x "$VENV/bin/python" ]; then
  want=false; [ "$SYSTEM_SITE" = 1 ] && want=true
  if ! grep -q "^include-system-site-packages = $want\$" "$VENV/pyvenv.cfg"; then
    sed -i "s/^include-system-site-packages = .*/include-system-site-packages = $want/" \
      "$VENV/pyvenv.cfg"
    say venv "$VENV kept; system site packages now $want"
  else
    say venv "$VENV exists, kept"
  fi
else
  venv_args=(); [ "$SYSTEM_SITE" = 1 ] && venv_args+=(--system-site-packages)
  "$PYTHON" -m venv "${venv_args[@]}" "$VENV" \
    || die "cannot make a venv with $PYTHON (Debian: apt-get install python3-venv)"
  say venv "$VENV created ($("$VENV/bin/python" -V))"
fi

if [ "$CHOWN" = 1 ] && ! (cd / && as_agent "$VENV/bin/python" -c '' 2>/dev/null); then
  die "$AGENT_USER cannot run $VENV/bin/python ($(readlink -f "$VENV/bin/python")): is that Python under a private directory such as /root? Remove $VENV and give --python /usr/bin/python3"
fi

STEP=package
extras="$(IFS=,; echo "${EXTRAS[*]}")"
# What was installed from: the source's content, the extras, pip's arguments, the venv.
fingerprint="$("$PYTHON" - "$SOURCE" "$extras" "$PIP_ARGS" "$SYSTEM_SITE" <<'EOF'
import hashlib, os, sys
source, *rest = sys.argv[1:]
digest = hashlib.sha256("\0".join(rest).encode())
def add(path):
    digest.update(os.path.relpath(path, source).encode() + b"\0")
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
if os.path.isfile(source):
    digest.update(open(source, "rb").read())
else:
    for top, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in
                         ("build", "dist", "__pycache__") and not d.endswith(".egg-info")
                         and not os.path.exists(os.path.join(top, d, "pyvenv.cfg")))
        for name in sorted(files):
            if not name.endswith((".pyc", ".pyo")):
                add(os.path.join(top, name))
print(digest.hexdigest())
EOF
)"
stamp="$PREFIX/installed-from"
if [ -f "$stamp" ] && [ "$(sed -n 2p "$stamp")" = "$fingerprint" ] && "$AGENT" --version >/dev/null 2>&1; then
  say package "$("$AGENT" --version) from $SOURCE, unchanged: kept"
else
  read -r -a pip_args <<<"$PIP_ARGS"
  log="$PREFIX/pip.log"
  say package "installing edgefleet[$extras] from $SOURCE (pip log: $log)"
  pip=("$VENV/bin/python" -m pip install --disable-pip-version-check --quiet
       ${pip_args[@]+"${pip_args[@]}"})
  # The dependencies as needed, then the package itself replaced even at the same version.
  if ! { "${pip[@]}" "${SOURCE}[$extras]" && "${pip[@]}" --force-reinstall --no-deps "$SOURCE"; } \
      >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "pip install failed (all of it in $log)"
  fi
  printf '%s\n%s\n' "$SOURCE [$extras]" "$fingerprint" >"$stamp"
  say package "$("$AGENT" --version) installed"
  CHANGED=1
fi

# ---------------------------------------------------------------- state dir
STEP=state
if [ -d "$STATE" ]; then
  if [ "$(stat -c %a "$STATE")" != 700 ]; then
    chmod 0700 "$STATE"; say state "$STATE mode set to 0700"
  else
    say state "$STATE exists (0700), kept"
  fi
else
  mkdir -p "$(dirname "$STATE")"
  mkdir -m 0700 "$STATE"
  say state "$STATE created (0700)"
fi
if [ "$CHOWN" = 1 ] && [ "$(stat -c %U "$STATE")" != "$AGENT_USER" ]; then
  chown "$AGENT_USER:$AGENT_USER" "$STATE"
  say state "$STATE now owned by $AGENT_USER"
fi

# ---------------------------------------------------------------- config
STEP=config
mkdir -p "$ETC"
if [ -e "$CONFIG" ]; then
  say config "$CONFIG exists, not overwritten"
else
  tmp="$(mktemp "$ETC/.agent.toml.XXXXXX")"
  cat >"$tmp" <<EOF
# edgefleet agent settings: read by \`edge-agent --config $CONFIG run\` (the
# service's ExecStart) and by edge-agent status / doctor / rollback on this device.
# Keys are \`edge-agent run\`'s options with underscores (see \`edge-agent run --help\`);
# an unknown key or a wrong type stops the agent, naming the key. The command line and
# EDGE_AGENT_* variables win over this file. install-agent.sh never overwrites it.
# The device id, the fleet and the broker account come from enrollment
# ($STATE/identity.json): nothing to set here for them.

[agent]
state_dir = "$STATE"
# listen = "127.0.0.1:8470"          # the local inference endpoint, or "off"
# interval = 10.0                    # seconds between heartbeats
# keepalive = 15                     # MQTT keepalive: how soon the fleet sees a lost device
# max_bundle_mb = 512.0              # refuse larger bundles
# outbox_mb = 64.0                   # disk for telemetry waiting for the broker
# drift_window = 300.0               # seconds per drift window
# threads = 2                        # cores one inference may use
# providers = ["CPUExecutionProvider"]
# log_level = "INFO"
# broker = "mqtts://broker.example:8883"  # only to override the enrolled broker

# [agent.labels]                     # reported to the fleet, for rollout selectors
# site = "berlin"
EOF
  chmod 0640 "$tmp"
  if [ "$AS_ROOT" = 1 ] && getent group "$AGENT_USER" >/dev/null; then
    chown "root:$AGENT_USER" "$tmp"
  fi
  mv "$tmp" "$CONFIG"
  say config "$CONFIG written (0640): a commented default"
fi

# ---------------------------------------------------------------- unit
STEP=unit
mkdir -p "$UNIT_DIR"
unit_tmp="$(mktemp)"
trap 'rm -f "$unit_tmp"' EXIT
if [ -n "$ROOT" ]; then
  sed -e "s#/opt/edgefleet#$ROOT/opt/edgefleet#g" -e "s#/etc/edgefleet#$ROOT/etc/edgefleet#g" \
      -e "s#/var/lib/edgefleet#$ROOT/var/lib/edgefleet#g" "$UNIT_TEMPLATE" >"$unit_tmp"
else
  cp "$UNIT_TEMPLATE" "$unit_tmp"
fi
unit="$UNIT_DIR/$UNIT_NAME"
if [ -f "$unit" ] && cmp -s "$unit_tmp" "$unit"; then
  say unit "$unit unchanged"
else
  verb=installed; [ -f "$unit" ] && verb=updated
  install -m 0644 "$unit_tmp" "$unit"
  say unit "$unit $verb"
  CHANGED=1
  [ "$SYSTEMD" = 1 ] && systemctl daemon-reload
fi
if [ "$SYSTEMD" = 1 ]; then
  systemctl enable --quiet "$UNIT_NAME"
  say unit "enabled (starts at boot)"
fi

# ---------------------------------------------------------------- enrollment
STEP=enroll
if [ -f "$STATE/identity.json" ]; then
  device="$("$VENV/bin/python" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["device_id"], "of", d["fleet_url"])' "$STATE/identity.json" 2>/dev/null || echo "a fleet's device")"
  say enroll "already enrolled as $device: skipped"
elif [ -n "$FLEET" ]; then
  "$AGENT" enroll --help 2>/dev/null | grep -q -- '--code' \
    || die "this edge-agent cannot enroll with a code (too old a package)"
  if ! out="$(cd / && as_agent "$AGENT" --config "$CONFIG" enroll --fleet "$FLEET" \
      --code "$CODE" --state-dir "$STATE" 2>&1)"; then
    echo "$out" >&2
    die "enrollment with $FLEET failed (a code is good once, for a limited time: ask for a new one with \`edge-fleet devices add NAME\`)"
  fi
  say enroll "$(echo "$out" | head -n 1)"
  CHANGED=1
else
  say enroll "not enrolled yet: give --fleet URL --code CODE (\`edge-fleet devices add NAME\` prints a code)"
fi
if [ "$CHOWN" = 1 ] && [ -n "$(find "$STATE" ! -user "$AGENT_USER" -print -quit)" ]; then
  chown -R "$AGENT_USER:$AGENT_USER" "$STATE"
  say state "$STATE contents now owned by $AGENT_USER"
fi

# ---------------------------------------------------------------- service
STEP=service
run_line="$AGENT --config $CONFIG run"
if [ ! -f "$STATE/identity.json" ] && [ ! -f "$STATE/tuf/root.json" ]; then
  say service "not started: the device is not enrolled"
elif [ "$SYSTEMD" = 0 ]; then
  say service "systemd does not run here: start the agent with: $run_line"
elif [ "$CHANGED" = 0 ] && systemctl is-active --quiet "$UNIT_NAME"; then
  say service "running, nothing changed: not restarted"
else
  verb=started; systemctl is-active --quiet "$UNIT_NAME" && verb=restarted
  systemctl restart "$UNIT_NAME" \
    || die "$UNIT_NAME did not start: systemctl status $UNIT_NAME; journalctl -u $UNIT_NAME -n 50"
  say service "$verb ($UNIT_NAME is ready)"
fi
STEP=finished
say "done" "check it with: $AGENT --config $CONFIG doctor"
