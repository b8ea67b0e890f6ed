"""``python -m fleet.simulator --devices 10 --broker mqtt://127.0.0.1:1883 ...``: the same as
``edge-fleet simulate``, without the rest of the fleet CLI."""

from __future__ import annotations

import argparse
import logging
import sys

import structlog

from fleet.simulator.cli import add_options, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleet.simulator", description=__doc__)
    add_options(parser)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    structlog.configure(  # logs on stderr: stdout carries the JSON lines
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(args.log_level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
