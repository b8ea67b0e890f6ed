"""structlog setup: JSON lines under systemd or in a pipe, readable output on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


def _current_stderr(*args: object) -> structlog.PrintLogger:
    """A logger on whatever ``sys.stderr`` is now: a factory bound to the stream at configure
    time keeps writing to it after it is replaced and closed (pytest's capture, a CLI's
    ``main()`` called in-process), and every later log call then fails."""
    return structlog.PrintLogger(sys.stderr)


def configure_logging(level: str = "info", json_lines: bool | None = None) -> None:
    """Logs go to stderr so stdout stays the program's answer (CLI text, JSON lines)."""
    as_json = (not sys.stderr.isatty()) if json_lines is None else json_lines
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=_current_stderr,
        cache_logger_on_first_use=False,
    )
