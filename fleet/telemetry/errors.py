"""Telemetry errors.

FleetError (fleet/errors.py)
+-- TelemetryError       telemetry      base of this package's errors
    +-- InvalidPayload   invalid        a message breaks the contract; ``reason`` is a stable code
    +-- StoreError       store          the database cannot be used as asked (schema too new, bad URL)
"""

from __future__ import annotations

from fleet.errors import FleetError


class TelemetryError(FleetError):
    code = "telemetry"


class InvalidPayload(TelemetryError):
    """``reason`` is one short stable code (``not_json``, ``device_mismatch``, ...) that the
    worker counts by; the message says what exactly was wrong, for the log."""

    code = "invalid"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class StoreError(TelemetryError):
    code = "store"
