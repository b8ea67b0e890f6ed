"""A fleet simulator: many devices that speak the agent's MQTT protocol (status, will,
telemetry with acks, signed update instructions and their events), light enough for 1,000
devices in one process on two cores. See fleet/simulator/fleet.py for the in-process API and
fleet/simulator/cli.py for ``edge-fleet simulate``.
"""

from fleet.simulator.config import ConfigError, Shares, SimConfig
from fleet.simulator.device import Counters, DeviceView
from fleet.simulator.fates import FATES, assign_fates, offline_devices
from fleet.simulator.fleet import Fleet, SimulatorError

__all__ = [
    "FATES",
    "ConfigError",
    "Counters",
    "DeviceView",
    "Fleet",
    "Shares",
    "SimConfig",
    "SimulatorError",
    "assign_fates",
    "offline_devices",
]
