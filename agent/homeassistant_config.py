"""The ``homeassistant:`` section of the agent config: Home Assistant MQTT discovery.

Kept apart from agent/config.py (which builds it with its generic loader: types and unknown
keys are reported there, each naming its key) so the section's own rules live beside it; the
documents and the publishing are in agent/homeassistant.py. This module sits below the config
layer and imports nothing of the agent.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

# Home Assistant's discovery topic levels <node_id> and <object_id>: only these characters
NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TEXT_CHARS = 255  # the most a Home Assistant text entity (and a sensor's state) may hold


@dataclass(frozen=True)
class HomeAssistantSettings:
    """Absent (null): no discovery; ``enabled: false`` keeps the section but publishes nothing.
    Either way the entries published before are cleared at the next start."""

    enabled: bool = True
    discovery_prefix: str = "homeassistant"  # Home Assistant's own default
    node_id: str | None = None  # None: the device id, with characters HA refuses made '_'
    questions: bool = True  # the text entity: questions from a dashboard, answered in a sensor
    state_interval_s: float = 30.0  # the queue depth and tokens/s document, at least this often


def default_node_id(device_id: str) -> str:
    """A device id as a discovery topic level: HA allows only ``[A-Za-z0-9_-]`` there, and a
    device id may also hold '.'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", device_id)[:64]


def check_homeassistant(s: HomeAssistantSettings) -> Iterator[str]:
    """Every problem of the section's values, each naming its key."""
    prefix = s.discovery_prefix
    if (
        not prefix
        or len(prefix) > 128
        or any(c in prefix for c in "#+\x00")
        or prefix.startswith(("$", "/"))
        or prefix.endswith("/")
        or "//" in prefix
    ):
        yield (
            f"homeassistant.discovery_prefix: {prefix[:80]!r} must be 1-128 characters of an MQTT "
            "topic without wildcards, a leading '$' or '/', a trailing '/' or empty levels"
        )
    if s.node_id is not None and not NODE_ID.fullmatch(s.node_id):
        yield f"homeassistant.node_id: {s.node_id[:80]!r} must be 1-64 letters, digits, '_' or '-'"
    if not 1.0 <= s.state_interval_s <= 86400.0:
        yield f"homeassistant.state_interval_s: {s.state_interval_s:g} must be within 1s..1d"
