"""MQTT transport: the only package that imports paho (and only its ``mqtt`` module does).

``mqtt`` is the connection (daemon and operators alike), ``client`` the operator's
request/reply on top of it, ``options`` the broker options of the operator command lines.
"""

from agent.transport.mqtt import Inbound, MqttError, MqttTransport

__all__ = ["Inbound", "MqttError", "MqttTransport"]
