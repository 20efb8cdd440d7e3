#!/usr/bin/env bash
# Add (or change) a broker account: a device (user name = device id) or the fleet
# (edgefleet-fleet). Prints the broker URL the agent or fleet should use.
#   deploy/mosquitto/add-account.sh cam-01 [PASSWORD_FILE] [BROKER_HOST]
set -euo pipefail
user="${1:?usage: add-account.sh USER [PASSWORD_FILE] [BROKER_HOST]}"
file="${2:-/etc/mosquitto/edgefleet.passwd}"
host="${3:-$(hostname -f)}"
if [[ ! "$user" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]]; then
  echo "error: '$user' is not a valid device id (1-64 of A-Z a-z 0-9 _ . -)" >&2
  exit 2
fi
password="$(head -c 24 /dev/urandom | base64 | tr -d '/+=' | head -c 32)"
[ -f "$file" ] || { touch "$file"; chmod 600 "$file"; }
mosquitto_passwd -b "$file" "$user" "$password"
pkill -HUP -x mosquitto 2>/dev/null || true   # reload accounts and ACL
echo "mqtt://$user:$password@$host:1883"
