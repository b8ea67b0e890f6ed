"""Rollout errors, each with a stable ``code`` the API and the CLI report.

FleetError (fleet/errors.py)
+-- RolloutError       code given per error: bad_target, bad_waves, bad_rules, bad_canary,
                       unknown_device, no_devices, not_found, bad_state
+-- LeaseLost          another driver holds the rollout: this one stops acting on it
"""

from __future__ import annotations

from fleet.errors import FleetError


class RolloutError(FleetError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LeaseLost(FleetError):
    code = "lease_lost"
