"""Errors the agent turns into replies; ``code`` is the stable wire value.

    AgentError                 code
    +-- BadRequest             bad_request        a request field is missing or invalid
    +-- TooLarge               too_large          prompt or max_tokens over a limit (``limit``)
    +-- Cancelled              cancelled          cancelled by the operator
    +-- ModelUnavailable       model_unavailable  no pack loaded, or the pack failed to load

Pack loading raises :mod:`model_packs.errors` (manifest, files, runtime); the engine
wraps those into ``ModelUnavailable`` only where a caller needs one code.
"""

from __future__ import annotations


class AgentError(Exception):
    code = "internal"

    def __init__(self, message: str, limit: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.limit = limit


class BadRequest(AgentError):
    code = "bad_request"


class TooLarge(AgentError):
    code = "too_large"


class Cancelled(AgentError):
    code = "cancelled"


class ModelUnavailable(AgentError):
    code = "model_unavailable"
