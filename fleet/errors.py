"""Fleet errors.

FleetError            code
+-- RepositoryError   repository   the signed repository cannot do what was asked
"""

from __future__ import annotations


class FleetError(Exception):
    code = "fleet_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RepositoryError(FleetError):
    code = "repository"
