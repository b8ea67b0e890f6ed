"""How every command line of the project ends on an error: one printer, one set of exit statuses.

``edge-agent``, ``edge-pack`` and ``edge-fleet`` all print ``prog: error [code]: message``
on stderr, so scripts can match the stable ``code`` whatever tool they drive, and all exit
with the same statuses. It lives in ``model_packs``, the one package both ``agent`` and
``fleet`` already import, so neither has to import the other for it.

Two ends that are not the project's errors are handled here too, for all three tools: output
piped into a reader that stops early (``edge-pack inspect PACK | head``) ends quietly instead
of with a ``BrokenPipeError`` traceback, and a command whose optional dependencies are not
installed (``edge-pack build`` on a device install) names the extra to install.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

EXIT_ERROR = 2  # the project refused: bad input, bad pack, bad repository, ...
EXIT_UNREACHABLE = 3  # the broker cannot be reached, or the device did not answer
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away, as a shell reports SIGPIPE

Errors = tuple[type[Exception], ...]

# The optional dependencies a command may import, by the extra that installs them
# (pyproject.toml's optional-dependencies); the device install has none of them.
EXTRAS = {
    "gguf": "build",
    "onnx": "build",
    "torch": "reference",
    "transformers": "reference",
    "accelerate": "reference",
    "sqlalchemy": "fleet",
    "psycopg": "fleet",
    "fastapi": "fleet",
    "uvicorn": "fleet",
    "prometheus_client": "fleet",
}
DISTRIBUTION = "edge-slm-agent"


class MissingExtra(Exception):
    """A command needs an optional dependency that this install left out."""

    code = "missing_extra"

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"this command needs the {extra!r} extra ({module} is not installed; a device install "
            f"leaves it out): pip install '{DISTRIBUTION}[{extra}]'"
        )


def error_line(prog: str, exc: BaseException) -> str:
    """``prog: error [code]: message``. The code is the error's most specific stable one
    (an update's ``reason_code`` before its class ``code``)."""
    code = getattr(exc, "reason_code", None) or getattr(exc, "code", None) or "error"
    message = getattr(exc, "message", None) or str(exc)
    return f"{prog}: error [{code}]: {message}"


def run_command(prog: str, command: Callable[[], int], errors: Errors, unreachable: Errors = ()) -> int:
    """Run ``command`` and return its exit status; the project's own ``errors`` (and
    ``unreachable``: broker and reply failures) are printed, not raised as tracebacks.
    Anything else is a bug and keeps its traceback."""
    try:
        status = command()
        sys.stdout.flush()  # a reader gone away shows here, not as a message at exit
        return status
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except unreachable as exc:
        print(error_line(prog, exc), file=sys.stderr)
        return EXIT_UNREACHABLE
    except errors as exc:
        print(error_line(prog, exc), file=sys.stderr)
        return EXIT_ERROR
    except ModuleNotFoundError as exc:
        module = (exc.name or "").split(".")[0]
        if module not in EXTRAS:
            raise
        print(error_line(prog, MissingExtra(module, EXTRAS[module])), file=sys.stderr)
        return EXIT_ERROR


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args``; ``--help`` piped into a reader that stops early exits quietly."""
    try:
        return parser.parse_args(argv)
    except SystemExit:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _discard_stdout()
        raise


def _discard_stdout() -> None:
    """Point stdout at /dev/null: the interpreter flushes it once more at exit, and that
    flush would print the BrokenPipeError again (the Python docs' recipe for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
