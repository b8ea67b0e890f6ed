"""How every command line of the project ends on an error: one printer, one set of exit statuses.

``edge-agent``, ``edge-pack`` and ``edge-fleet`` all print ``prog: error [code]: message``
on stderr, so scripts can match the stable ``code`` whatever tool they drive, and all exit
with the same statuses. It lives in ``model_packs``, the one package both ``agent`` and
``fleet`` already import, so neither has to import the other for it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_ERROR = 2  # the project refused: bad input, bad pack, bad repository, ...
EXIT_UNREACHABLE = 3  # the broker cannot be reached, or the device did not answer
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT

Errors = tuple[type[Exception], ...]


def error_line(prog: str, exc: BaseException) -> str:
    """``prog: error [code]: message``. The code is the error's most specific stable one
    (an update's ``reason_code`` before its class ``code``)."""
    code = getattr(exc, "reason_code", None) or getattr(exc, "code", None) or "error"
    message = getattr(exc, "message", None) or str(exc)
    return f"{prog}: error [{code}]: {message}"


def run_command(
    prog: str, command: Callable[[], int], errors: Errors, unreachable: Errors = ()
) -> int:
    """Run ``command`` and return its exit status; the project's own ``errors`` (and
    ``unreachable``: broker and reply failures) are printed, not raised as tracebacks.
    Anything else is a bug and keeps its traceback."""
    try:
        return command()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except unreachable as exc:
        print(error_line(prog, exc), file=sys.stderr)
        return EXIT_UNREACHABLE
    except errors as exc:
        print(error_line(prog, exc), file=sys.stderr)
        return EXIT_ERROR
