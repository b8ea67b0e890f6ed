"""The ``escalation:`` section of the config as the answering worker uses it (issue 12).

Why here: ``agent/config.py`` sits below ``agent/answers`` and may not import it, so the config
keeps the section as plain values (``EscalationSettings``) and this adapter turns them into the
:class:`~agent.answers.escalation.Escalator` and the :class:`~agent.answers.routing.RoutingPolicy`.
It is the one place the section is validated: :meth:`EscalationConfig.from_mapping` for the
endpoint's keys, :func:`_policy` for the routing keys. ``agent.app`` calls :func:`hybrid_from`
when the agent starts and on every reload, before anything is served or swapped, so a bad value
is ``bad_config`` naming the key, and a reload that fails keeps the running configuration.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from agent.answers.escalation import EscalationConfig, Escalator
from agent.answers.routing import Escalation, RoutingPolicy
from agent.config import EscalationSettings
from agent.errors import ConfigError

_POLICY_KEYS = ("confidence_threshold", "min_remote_s", "min_local_s")


@dataclass(frozen=True)
class Hybrid:
    """What the worker needs to route one request: the client (None: off) and the policy."""

    escalator: Escalator | None = None
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)

    @property
    def escalation(self) -> Escalation:
        """The privacy rule as routing sees it: ``off`` without an endpoint or with ``none``."""
        if self.escalator is None or not self.escalator.config.enabled:
            return "off"
        privacy = self.escalator.config.privacy
        return "facts" if privacy == "facts" else "facts_and_question"


OFF = Hybrid()


def _policy(s: EscalationSettings) -> RoutingPolicy:
    """The routing keys; a value out of range is a ConfigError naming the key."""
    if not (math.isfinite(s.confidence_threshold) and -100.0 <= s.confidence_threshold <= 0.0):
        raise ConfigError(
            f"escalation.confidence_threshold: {s.confidence_threshold} must be a mean token "
            "log-probability within -100..0"
        )
    for key in ("min_remote_s", "min_local_s"):
        value = getattr(s, key)
        if not (math.isfinite(value) and 0.0 <= value <= 600.0):
            raise ConfigError(f"escalation.{key}: {value} must be within 0..600 seconds")
    return RoutingPolicy(s.confidence_threshold, s.min_remote_s, s.min_local_s)


def hybrid_from(settings: EscalationSettings | None) -> Hybrid:
    """The section validated and built (reads ``api_key_file`` and ``ca_file``); raises
    ConfigError (``bad_config``) with the key path and the reason."""
    if settings is None:
        return OFF
    policy = _policy(settings)
    endpoint = {
        k: v for k, v in dataclasses.asdict(settings).items() if k not in _POLICY_KEYS and v is not None
    }
    try:
        config = EscalationConfig.from_mapping(endpoint, "escalation")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Hybrid(Escalator(config), policy)
