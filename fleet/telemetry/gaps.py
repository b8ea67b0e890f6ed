"""Which sequence numbers a device's records are missing: pure arithmetic, no IO.

A device numbers its records 1, 2, 3, ... and never reuses a number, so every number below
the highest one seen is either stored, still on its way (an ``open`` gap: a spool draining
late, a worker that will get the message again after a restart) or gone for good because the
device's spool dropped it and said so in a ``dropped`` record (a ``lost`` gap). Records that
arrive after all shrink or remove a gap of either state.

The store loads the gaps a batch can touch, calls :func:`advance` and writes back the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

OPEN = "open"
LOST = "lost"


@dataclass(frozen=True, order=True)
class Gap:
    from_seq: int
    to_seq: int
    state: str = OPEN

    def __post_init__(self) -> None:
        if not 1 <= self.from_seq <= self.to_seq or self.state not in (OPEN, LOST):
            raise ValueError(f"not a gap: {self}")


def advance(
    gaps: Sequence[Gap], prev_max: int, new_seqs: Iterable[int], dropped: Iterable[tuple[int, int]] = ()
) -> tuple[list[Gap], int]:
    """The gaps after records ``new_seqs`` (newly stored, any order) and the ``dropped``
    ranges they announce arrived, and the new highest seq. ``gaps`` are the known gaps
    (the ones these seqs and ranges can touch), ``prev_max`` the highest seq stored before."""
    seqs = sorted(set(new_seqs))
    new_max = max([prev_max, *seqs])
    result = [piece for gap in gaps for piece in _without(gap, seqs)]
    result += _missing_between(prev_max, new_max, [s for s in seqs if s > prev_max])
    for first, last in dropped:
        result = [piece for gap in result for piece in _mark_lost(gap, first, last)]
    return _merged(result), new_max


def _without(gap: Gap, seqs: Sequence[int]) -> list[Gap]:
    """``gap`` minus the seqs that arrived inside it (``seqs`` sorted)."""
    pieces, start = [], gap.from_seq
    for seq in seqs:
        if seq < start or seq > gap.to_seq:
            continue
        if seq > start:
            pieces.append(Gap(start, seq - 1, gap.state))
        start = seq + 1
    if start <= gap.to_seq:
        pieces.append(Gap(start, gap.to_seq, gap.state))
    return pieces


def _missing_between(prev_max: int, new_max: int, above: Sequence[int]) -> list[Gap]:
    """Open gaps between the old highest seq and the new one (``above`` sorted, all > prev_max)."""
    if new_max <= prev_max:
        return []
    return _without(Gap(prev_max + 1, new_max), above)


def _mark_lost(gap: Gap, first: int, last: int) -> list[Gap]:
    lo, hi = max(gap.from_seq, first), min(gap.to_seq, last)
    if lo > hi or gap.state == LOST:
        return [gap]
    pieces = [Gap(lo, hi, LOST)]
    if gap.from_seq < lo:
        pieces.append(Gap(gap.from_seq, lo - 1, gap.state))
    if hi < gap.to_seq:
        pieces.append(Gap(hi + 1, gap.to_seq, gap.state))
    return pieces


def _merged(gaps: Iterable[Gap]) -> list[Gap]:
    """Sorted, with touching gaps of one state joined: one row per missing range."""
    out: list[Gap] = []
    for gap in sorted(gaps):
        if out and out[-1].state == gap.state and out[-1].to_seq + 1 == gap.from_seq:
            out[-1] = Gap(out[-1].from_seq, gap.to_seq, gap.state)
        else:
            out.append(gap)
    return out
