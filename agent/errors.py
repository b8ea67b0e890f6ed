"""Errors the agent turns into replies; ``code`` is the stable wire value.

    AgentError                 code
    +-- BadRequest             bad_request        a request field is missing or invalid
    +-- TooLarge               too_large          prompt or max_tokens over a limit (``limit``)
    +-- Cancelled              cancelled          cancelled by the operator
    +-- ModelUnavailable       model_unavailable  no pack loaded, or the pack failed to load
    +-- BadJson                bad_json           payload is not UTF-8 JSON
    +-- UnknownSensor          unknown_sensor     a read names a sensor the agent does not have
    +-- QueueFull              queue_full         the request queue (or the client's share) is full
    +-- RateLimited            rate_limited       the client sends faster than its rate limit
    +-- Timeout                timeout            the request's deadline passed
    +-- Forbidden              forbidden          a privileged action and this device trusts no operator key
    +-- Unauthorized           unauthorized       a privileged action not signed by a trusted operator key
    +-- WrongDevice            wrong_device       a signed instruction for another device
    +-- Replayed               replayed           a signed instruction not newer than one already accepted
    +-- Interrupted            interrupted        the agent stopped (crash, power cut) mid-request
    +-- ConfigError            bad_config         the configuration is invalid (start-up only)

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


class BadJson(AgentError):
    code = "bad_json"


class UnknownSensor(AgentError):
    code = "unknown_sensor"


class QueueFull(AgentError):
    code = "queue_full"


class RateLimited(AgentError):
    code = "rate_limited"


class Timeout(AgentError):
    code = "timeout"


class Forbidden(AgentError):
    code = "forbidden"


class Unauthorized(AgentError):
    code = "unauthorized"


class WrongDevice(AgentError):
    code = "wrong_device"


class Replayed(AgentError):
    code = "replayed"


class Interrupted(AgentError):
    code = "interrupted"


class ConfigError(AgentError):
    code = "bad_config"
