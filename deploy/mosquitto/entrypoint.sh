#!/bin/sh
# Write the password file from the environment, then run mosquitto. Logins: the agent
# (EDGE_AGENT_DEVICE_ID / EDGE_AGENT_MQTT_PASSWORD, the same variables the agent reads), an
# operator (EDGE_OPS_PASSWORD, user ops) and a fleet ingest worker (EDGE_FLEET_PASSWORD, user
# fleet: it acks the agent's telemetry on edge/<id>/telemetry/ack). Without the agent's the
# broker refuses to start: it never runs anonymous.
set -eu
: "${EDGE_AGENT_DEVICE_ID:?set the device id (balena: a device variable)}"
: "${EDGE_AGENT_MQTT_PASSWORD:?set the agent's broker password (edge-fleet device provision writes one)}"
umask 077
mosquitto_passwd -b -c /mosquitto/config/passwd "$EDGE_AGENT_DEVICE_ID" "$EDGE_AGENT_MQTT_PASSWORD"
if [ -n "${EDGE_OPS_PASSWORD:-}" ]; then
  mosquitto_passwd -b /mosquitto/config/passwd ops "$EDGE_OPS_PASSWORD"
fi
if [ -n "${EDGE_FLEET_PASSWORD:-}" ]; then
  mosquitto_passwd -b /mosquitto/config/passwd fleet "$EDGE_FLEET_PASSWORD"
fi
chown mosquitto /mosquitto/config/passwd
exec mosquitto -c /mosquitto/config/mosquitto.conf
