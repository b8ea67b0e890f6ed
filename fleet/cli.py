"""``edge-fleet``: fleet manager's command line.

Signed repositories, rollouts and telemetry arrive with their issues; until then the
command lists the packs this machine has built, which is what a fleet would publish.
"""

from __future__ import annotations

import argparse
import sys

from model_packs.errors import PackError
from model_packs.format import packs_dir, read_manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-fleet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("packs", help="list packs in the local cache with their evaluation")
    p.parse_args(argv)
    root = packs_dir()
    found = (
        sorted(d for d in root.glob("*") if d.is_dir() and not d.name.startswith("."))
        if root.exists()
        else []
    )
    for d in found:
        try:
            m = read_manifest(d)
        except PackError as exc:
            print(f"{d.name}\tunreadable [{exc.code}]")
            continue
        print(
            f"{m.name}\t{m.version}\ttop1={m.evaluation.top1_agreement:.3f}\tppl_ratio={m.evaluation.ppl_ratio:.3f}"
        )
    if not found:
        print(f"no packs in {root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
