#!/usr/bin/env bash
# Broker accounts for edgefleet, kept by Mosquitto's dynamic-security plugin.
#
#   add-account.sh --init [CONFIG]          once, before the broker's first start: the account
#                                           store (deny by default) and an admin account
#   add-account.sh NAME [CONFIG] [HOST]     add an account, or give it a new password, and
#                                           print the broker URL it connects with
#
# NAME is a device id (cam-01: client id edgefleet-agent-cam-01, publishes only under its own
# id, reads only its own desired state) or edgefleet-fleet-WORKER (a fleet worker run with
# EDGEFLEET_WORKER_ID=WORKER: client id edgefleet-fleet-WORKER, the device channels, the
# fleet's shared subscriptions, desired states). Every account may connect only with its own
# client id, so nobody can take over another's session. Other names starting with
# "edgefleet-" are reserved.
#
# CONFIG (default /etc/mosquitto/mosquitto.conf) gives the port (first `listener`), the pid
# file, the broker's user and the store (`plugin_opt_config_file`). Changes go to that broker
# only, live over its own $CONTROL topic as the admin account (credentials in
# <CONFIG's directory>/edgefleet-admin/, readable by whoever ran --init): no signal, no reload.
# Exit codes: 0 done, 1 failed, 2 invalid arguments.
set -euo pipefail
umask 077

NAME_RE='^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'
FLEET_PREFIX='edgefleet-fleet-'
DEVICE_CLIENT_PREFIX='edgefleet-agent-'
ADMIN='edgefleet-admin'
FLEET_ROLE='edgefleet-fleet'
TREE='edgefleet/v1/devices'
CONTROL='$CONTROL/dynamic-security/v1'

fail() { echo "error: $1" >&2; exit "${2:-1}"; }
usage() { fail "usage: add-account.sh --init [CONFIG] | add-account.sh NAME [CONFIG] [HOST]" 2; }

# The first value of a top-level setting in the broker's config ("" if absent).
setting() { sed -n "s/^[[:space:]]*$1[[:space:]]\{1,\}\(.*[^[:space:]]\)[[:space:]]*$/\1/p" "$config" | head -n 1; }

acl() { printf '{"acltype":"%s","topic":"%s","allow":true}' "$1" "$2"; }

# Send dynamic-security commands (JSON) to this broker as the admin; prints the answer.
# mosquitto_rr 2.0.11 never loads -f/-s input, and a command line is visible to every local
# user: commands that carry a password ($2 = secret) go in a private copy of the options file.
control() {
  local dir rc=0 answer
  local message=(-m "$1")
  dir="$(mktemp -d)"
  cp "$admin_dir/mosquitto_rr" "$dir/mosquitto_rr"
  if [ "${2:-}" = secret ]; then
    printf -- '-m %s\n' "$1" >>"$dir/mosquitto_rr"
    message=()
  fi
  answer="$(XDG_CONFIG_HOME="$dir" mosquitto_rr -h "$control_host" -p "$port" \
      -t "$CONTROL" -e "$CONTROL/response" -W 20 "${message[@]}" 2>&1)" || rc=$?
  rm -rf "$dir"
  [ "$rc" = 0 ] || fail "the broker at $control_host:$port did not answer $ADMIN: $answer"
  printf '%s\n' "$answer"
}

[ $# -ge 1 ] || usage
mode=add
if [ "$1" = "--init" ]; then
  mode=init
  [ $# -le 2 ] || usage
else
  [ $# -le 3 ] || usage
  name="$1"
  [[ "$name" =~ $NAME_RE ]] \
    || fail "'$name' is not a valid account name (1-64 of A-Z a-z 0-9 _ . -, not starting with _ . -)" 2
  if [[ "$name" == "$FLEET_PREFIX"* ]]; then
    kind=fleet
    [[ "${name#"$FLEET_PREFIX"}" =~ ^[A-Za-z0-9] ]] || fail "'$name' names no fleet worker" 2
  elif [[ "$name" == edgefleet-* ]]; then
    fail "'$name' is reserved: a device id may not start with 'edgefleet-'" 2
  else
    kind=device
  fi
fi
config="${2:-/etc/mosquitto/mosquitto.conf}"
[ -r "$config" ] || fail "cannot read the broker config $config"

store="$(setting plugin_opt_config_file)"
[ -n "$store" ] || fail "$config loads no dynamic-security store (plugin_opt_config_file)"
listener="$(setting listener)"
port="${listener%%[[:space:]]*}"
[[ "$port" =~ ^[0-9]+$ ]] || fail "$config has no 'listener PORT' line"
bind=""
[ "$listener" = "$port" ] || bind="${listener#*[[:space:]]}"
case "$bind" in ""|0.0.0.0|::) control_host=127.0.0.1 ;; *) control_host="$bind" ;; esac
broker_user="$(setting user)"
broker_user="${broker_user:-mosquitto}"
pid_file="$(setting pid_file)"
admin_dir="$(cd "$(dirname "$config")" && pwd)/edgefleet-admin"

broker_running() {  # its own pid file, and that pid is a mosquitto
  local pid
  [ -n "$pid_file" ] && [ -r "$pid_file" ] || return 1
  pid="$(tr -dc 0-9 <"$pid_file")"
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = mosquitto ]
}

if [ "$mode" = init ]; then
  [ ! -e "$store" ] || fail "$store already exists: the store is made once (add accounts now)"
  store_dir="$(dirname "$store")"
  [ -d "$store_dir" ] || fail "no directory $store_dir"
  if [ "$(id -u)" = 0 ] && [ "$broker_user" != root ] && id "$broker_user" >/dev/null 2>&1 \
      && command -v runuser >/dev/null && ! runuser -u "$broker_user" -- test -w "$store_dir"; then
    fail "$store_dir is not writable by $broker_user, who the broker runs as: it saves the store there"
  fi
  mkdir -p "$admin_dir"
  admin_password="$(head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32)"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  # mosquitto_ctrl hashes the admin password the way the plugin checks it; the rest of its
  # starter file (an admin that may subscribe to '#', default access open) is not used.
  printf '%s\n%s\n' "$admin_password" "$admin_password" \
    | mosquitto_ctrl dynsec init "$work/init.json" "$ADMIN" >/dev/null
  field() { sed -n "s/^[[:space:]]*\"$1\":[[:space:]]*\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}[[:space:]]*$/\1/p" "$work/init.json" | head -n 1; }
  hash="$(field password)" salt="$(field salt)" iterations="$(field iterations)"
  [ -n "$hash" ] && [ -n "$salt" ] && [[ "$iterations" =~ ^[0-9]+$ ]] \
    || fail "cannot read the admin password hash made by mosquitto_ctrl"
  fleet_acls=""
  for channel in status reported; do
    fleet_acls+="$(acl subscribePattern "$TREE/+/$channel"),$(acl unsubscribePattern "$TREE/+/$channel"),"
  done
  # High-volume channels: shared by several workers, or direct for a lone worker (Mosquitto
  # 2.0 does not restore shared subscriptions after its own restart; direct ones it does).
  for channel in telemetry events drift; do
    fleet_acls+="$(acl subscribePattern "\$share/fleet/$TREE/+/$channel"),"
    fleet_acls+="$(acl unsubscribePattern "\$share/fleet/$TREE/+/$channel"),"
    fleet_acls+="$(acl subscribePattern "$TREE/+/$channel"),$(acl unsubscribePattern "$TREE/+/$channel"),"
  done
  for channel in status reported telemetry events drift; do
    fleet_acls+="$(acl publishClientReceive "$TREE/+/$channel"),"
  done
  # desired states; an empty retained message clears a refused status/reported
  for channel in desired status reported; do
    fleet_acls+="$(acl publishClientSend "$TREE/+/$channel"),"
  done
  cat >"$work/store.json" <<EOF
{
  "defaultACLAccess": {"publishClientSend": false, "publishClientReceive": false,
                       "subscribe": false, "unsubscribe": false},
  "clients": [{"username": "$ADMIN", "clientid": "$ADMIN", "textname": "edgefleet accounts",
               "password": "$hash", "salt": "$salt", "iterations": $iterations,
               "roles": [{"rolename": "$ADMIN"}]}],
  "groups": [],
  "roles": [
    {"rolename": "$ADMIN", "acls": [$(acl publishClientSend "$CONTROL"),
      $(acl publishClientReceive "$CONTROL/response"), $(acl subscribeLiteral "$CONTROL/response"),
      $(acl unsubscribeLiteral "$CONTROL/response")]},
    {"rolename": "$FLEET_ROLE", "acls": [${fleet_acls%,}]}
  ]
}
EOF
  printf -- '-u %s\n-P %s\n-i %s\n' "$ADMIN" "$admin_password" "$ADMIN" >"$admin_dir/mosquitto_rr"
  install -m 600 "$work/store.json" "$store"
  if [ "$(id -u)" = 0 ] && id "$broker_user" >/dev/null 2>&1; then
    chown "$broker_user:" "$store"
  fi
  echo "account store $store made (admin credentials in $admin_dir)" >&2
  if broker_running; then
    echo "restart the broker to load it (the store is read at start only)" >&2
  fi
  exit 0
fi

host="${3:-}"
if [ -z "$host" ]; then
  case "$bind" in ""|0.0.0.0|::) host="$(hostname -f 2>/dev/null || hostname)" ;; *) host="$bind" ;; esac
fi
[ -r "$admin_dir/mosquitto_rr" ] || fail "no admin credentials in $admin_dir: run add-account.sh --init $config first"
if [ -n "$pid_file" ] && ! broker_running; then
  fail "the broker of $config is not running (pid file $pid_file)"
fi

exec 9>"$admin_dir/lock"
flock 9   # one admin session at a time: they share the admin's client id

password="$(head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32)"
if [ "$kind" = device ]; then
  client_id="$DEVICE_CLIENT_PREFIX$name"
  role="edgefleet-device-$name"
  device_acls="$(acl publishClientReceive "$TREE/$name/desired"),$(acl subscribeLiteral "$TREE/$name/desired"),$(acl unsubscribeLiteral "$TREE/$name/desired")"
  for channel in status reported telemetry events drift; do
    device_acls+=",$(acl publishClientSend "$TREE/$name/$channel")"
  done
  role_command="{\"command\":\"createRole\",\"rolename\":\"$role\",\"acls\":[$device_acls]}"
else
  client_id="$name"
  role="$FLEET_ROLE"
  role_command=""
fi
if [ -n "$role_command" ]; then
  answer="$(control "{\"commands\":[$role_command]}")"
  [[ "$answer" != *'"error"'* || "$answer" == *'"Role already exists"'* ]] \
    || fail "the broker refused: $answer"
fi
answer="$(control "{\"commands\":[{\"command\":\"createClient\",\"username\":\"$name\",\"password\":\"$password\",\"clientid\":\"$client_id\",\"roles\":[{\"rolename\":\"$role\"}]}]}" secret)"
if [[ "$answer" == *'"Client already exists"'* ]]; then
  answer="$(control "{\"commands\":[{\"command\":\"setClientId\",\"username\":\"$name\",\"clientid\":\"$client_id\"},{\"command\":\"setClientPassword\",\"username\":\"$name\",\"password\":\"$password\"}]}" secret)"
fi
[[ "$answer" != *'"error"'* ]] || fail "the broker refused: $answer"
echo "mqtt://$name:$password@$host:$port"
