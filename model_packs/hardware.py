"""Hardware tags: what a device says about its CPU, and what a pack variant is published for.

A release (``NAME@VERSION``) has a base target that runs anywhere and may have variants, each
published for hardware tags (``edge-fleet pack publish --hardware TAG``). The device derives its
tags from its own CPU at install time and takes the first variant published for one of them
(``agent/packs/decide.py``). The tags are few and stable because the fleet and every device
must spell them alike:

- ``x86_64``; ``aarch64``, plus exactly one of ``aarch64-dotprod`` (ARMv8.2 dot-product
  instructions, ``asimddp``: Cortex-A55/A76, Raspberry Pi 5, Jetson Orin) and
  ``aarch64-no-dotprod`` (ARMv8.0: Cortex-A53/A72, Raspberry Pi 3 and 4, Jetson Nano).
  Without dot-product onnxruntime computes 8-bit ``MatMulNBits`` in fp32 (measured under
  emulation: about 53 times the instructions per token of a Cortex-A76), so such boards want
  the 4-bit variant, whose kernel has an fp32 path made for them.
- the board name in ``updates.hardware`` when set (e.g. ``rpi4``), for a fleet that targets
  boards by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model_packs import runtimes

ANY = "any"
NO_DOTPROD = "aarch64-no-dotprod"
DOTPROD = "aarch64-dotprod"
WHY = {
    NO_DOTPROD: "this CPU has no dot-product instructions (ARMv8.0), where 8-bit weights compute in fp32",
    DOTPROD: "this CPU has dot-product instructions (ARMv8.2 and later)",
}


@dataclass(frozen=True)
class Profile:
    """This device's CPU as the update rules see it."""

    machine: str
    features: frozenset[str]
    tags: frozenset[str]
    ram_mb: int | None = None  # MemTotal: which variant of a release this board can hold


def cpu_features(cpuinfo: str) -> frozenset[str]:
    """The first ``Features`` (arm64) or ``flags`` (x86) line of /proc/cpuinfo, as a set."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("features", "flags"):
            return frozenset(value.split())
    return frozenset()


def tags_for(machine: str, features: frozenset[str], board: str = ANY) -> frozenset[str]:
    """The hardware tags of a CPU (and board name, unless it is ``any``)."""
    tags = {machine}
    if machine == "aarch64":
        tags.add(DOTPROD if "asimddp" in features else NO_DOTPROD)
    if board and board != ANY:
        tags.add(board)
    return frozenset(tags)


def total_ram_mb(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemTotal in MB: the board's RAM, not what is free now (a variant is chosen for the
    board; the health gate checks what is free at install). None where it cannot be read."""
    try:
        for line in meminfo.read_text(errors="replace").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def detect(board: str = ANY, cpuinfo: Path = Path("/proc/cpuinfo"), ram_mb: int | None = None) -> Profile:
    """This machine's profile; a missing /proc/cpuinfo gives no features (never an error).
    ``ram_mb`` overrides the board's MemTotal (tests, a container with a memory limit)."""
    try:
        features = cpu_features(cpuinfo.read_text(errors="replace"))
    except OSError:
        features = frozenset()
    arch = runtimes.machine()
    ram = ram_mb if ram_mb is not None else total_ram_mb()
    return Profile(arch, features, tags_for(arch, features, board), ram)
