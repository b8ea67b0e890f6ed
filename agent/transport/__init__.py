"""MQTT transport: the only package that imports paho."""

from agent.transport.mqtt import Inbound, MqttTransport

__all__ = ["Inbound", "MqttTransport"]
