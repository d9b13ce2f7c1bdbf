#!/bin/sh
# One-shot (service mosquitto-init, image eclipse-mosquitto:2), before the broker starts:
#   1. creates the dynamic security file with the admin account, unless it exists;
#   2. on a private, loopback-only broker using that file, ensures the gateway's role and
#      account: subscribe devices/+/up/# (plain and as $share/gateway/...), receive
#      devices/+/up/#, send devices/+/down/#; its password follows GATEWAY_MQTT_PASSWORD;
#   3. checks, as the gateway, that the subscriptions are granted and that the admin login works.
# Idempotent: safe on every `docker compose up`. To change the admin password, use
# `mosquitto_ctrl dynsec setClientPassword` (or drop the mosquitto-dynsec volume).
set -eu

DYNSEC_FILE=${MOSQUITTO_DYNSEC_FILE:-/mosquitto/dynsec/dynamic-security.json}
PLUGIN=${MOSQUITTO_DYNSEC_PLUGIN:-/usr/lib/mosquitto_dynamic_security.so}
PORT=${MOSQUITTO_INIT_PORT:-18830}
ADMIN_USER=${MOSQUITTO_ADMIN_USERNAME:?MOSQUITTO_ADMIN_USERNAME is required}
ADMIN_PASS=${MOSQUITTO_ADMIN_PASSWORD:?MOSQUITTO_ADMIN_PASSWORD is required}
GW_USER=${GATEWAY_MQTT_USERNAME:?GATEWAY_MQTT_USERNAME is required}
GW_PASS=${GATEWAY_MQTT_PASSWORD:?GATEWAY_MQTT_PASSWORD is required}
GW_ROLE=gateway

log() { echo "mosquitto-init: $*"; }

mkdir -p "$(dirname "$DYNSEC_FILE")"
if [ -s "$DYNSEC_FILE" ]; then
  log "keeping existing $DYNSEC_FILE"
else
  log "creating $DYNSEC_FILE with admin account '$ADMIN_USER'"
  mosquitto_ctrl dynsec init "$DYNSEC_FILE" "$ADMIN_USER" "$ADMIN_PASS" >/dev/null
  [ -s "$DYNSEC_FILE" ] || { log "dynsec init did not create $DYNSEC_FILE"; exit 1; }
fi

workdir=$(mktemp -d)
cat >"$workdir/mosquitto.conf" <<CONF
user root
per_listener_settings false
listener $PORT 127.0.0.1
allow_anonymous false
persistence false
log_dest stderr
log_type error
log_type warning
plugin $PLUGIN
plugin_opt_config_file $DYNSEC_FILE
CONF

mosquitto -c "$workdir/mosquitto.conf" &
broker=$!
cleanup() {
  kill "$broker" 2>/dev/null || true
  wait "$broker" 2>/dev/null || true
  rm -rf "$workdir"
}
trap cleanup EXIT

# mosquitto_ctrl 2.0 exits 0 even on errors ("Role already exists", "Not authorized"),
# so every step below is written to be repeatable and the result is checked at the end.
ctrl() {
  mosquitto_ctrl -h 127.0.0.1 -p "$PORT" -u "$ADMIN_USER" -P "$ADMIN_PASS" dynsec "$@" 2>&1 \
    | grep -v -e 'without encryption' -e 'visible on the network' -e '^$' || true
}

# As admin: wait for the private broker, then prove the admin account works.
i=0
# $CONTROL is an MQTT topic, not a shell variable.
# shellcheck disable=SC2016
until out=$(mosquitto_sub -h 127.0.0.1 -p "$PORT" -u "$ADMIN_USER" -P "$ADMIN_PASS" \
  -t '$CONTROL/dynamic-security/v1/response' -E 2>&1); do
  case "$out" in
    *authori*)
      log "cannot log in as '$ADMIN_USER': wrong admin password for $DYNSEC_FILE?"
      exit 1
      ;;
  esac
  i=$((i + 1))
  if [ "$i" -ge 50 ] || ! kill -0 "$broker" 2>/dev/null; then
    log "cannot log in as '$ADMIN_USER' on the private broker: $out"
    exit 1
  fi
  sleep 0.2
done

ctrl createRole "$GW_ROLE" >/dev/null
# Exactly these ACLs: remove (if present), then add.
while read -r acltype topic; do
  [ -n "$acltype" ] || continue
  ctrl removeRoleACL "$GW_ROLE" "$acltype" "$topic" >/dev/null
  ctrl addRoleACL "$GW_ROLE" "$acltype" "$topic" allow
done <<ACLS
subscribeLiteral devices/+/up/#
subscribeLiteral \$share/$GW_ROLE/devices/+/up/#
subscribePattern devices/+/up/#
unsubscribeLiteral devices/+/up/#
unsubscribeLiteral \$share/$GW_ROLE/devices/+/up/#
publishClientReceive devices/+/up/#
publishClientSend devices/+/down/#
ACLS

ctrl createClient "$GW_USER" -p "$GW_PASS" >/dev/null
ctrl setClientPassword "$GW_USER" "$GW_PASS"
ctrl addClientRole "$GW_USER" "$GW_ROLE" >/dev/null

# Check as the gateway: each subscription must be granted, a command publish accepted.
for filter in 'devices/+/up/#' "\$share/$GW_ROLE/devices/+/up/#"; do
  out=$(mosquitto_sub -V mqttv5 -h 127.0.0.1 -p "$PORT" -u "$GW_USER" -P "$GW_PASS" \
    -t "$filter" -E 2>&1) || { log "gateway cannot subscribe to $filter: $out"; exit 1; }
  case "$out" in
    *denied* | *rror*) log "gateway cannot subscribe to $filter: $out"; exit 1 ;;
  esac
done
out=$(mosquitto_pub -V mqttv5 -q 1 -h 127.0.0.1 -p "$PORT" -u "$GW_USER" -P "$GW_PASS" \
  -t 'devices/mosquitto-init/down/command' -m '{}' 2>&1) || {
  log "gateway cannot publish commands: $out"; exit 1; }
case "$out" in
  *authori* | *rror*) log "gateway cannot publish commands: $out"; exit 1 ;;
esac

# The broker itself runs as user mosquitto: it must be able to rewrite the file.
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
  chown -R mosquitto:mosquitto "$(dirname "$DYNSEC_FILE")"
fi
chmod 0700 "$(dirname "$DYNSEC_FILE")"
chmod 0600 "$DYNSEC_FILE"
log "gateway account '$GW_USER' ready"
