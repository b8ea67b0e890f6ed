"""MQTT topic filter matching, shared by the agent's reply policy and the fleet simulator's
copy of it (both sides must judge a reply topic the same way)."""

from __future__ import annotations


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching: ``+`` is one level, a final ``#`` any number (also none)."""
    pat, top = pattern.split("/"), topic.split("/")
    for i, level in enumerate(pat):
        if level == "#":
            return True
        if i >= len(top) or (level != "+" and level != top[i]):
            return False
    return len(pat) == len(top)
