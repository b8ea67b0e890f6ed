"""The lowest onnxruntime that runs a pack, per CPU architecture, found by test.

The builder writes these floors into every manifest (``runtime.onnxruntime`` for any machine,
``runtime.onnxruntime_by_machine`` where an architecture needs more), ``pyproject.toml`` states
the same ones as environment markers (``tests/test_runtimes.py`` keeps the two equal), and the
device checks its own before a pack is activated, so a runtime below the floor is a
``runtime_mismatch`` refusal, never a crash at the first query.

Measured (``tests/test_runtime_floor.py`` on x86_64, ``make test-arm64`` with
``--onnxruntime VERSION`` on aarch64, the default pack's fused graph):

- x86_64: 1.20.1 and 1.21.1 refuse the graph at session start ("Only 4b quantization is
  supported for MatMulNBits op"); 1.22.0 runs it.
- aarch64: 1.22.1 loads it and fails at the first run ("Only 4b quantization is supported for
  unpacked compute"); 1.23.0 runs it on Cortex-A72 and Cortex-A76 models.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
from collections.abc import Mapping

# machine -> lowest onnxruntime; an architecture not named here gets the highest floor
ORT_FLOORS: Mapping[str, str] = {"x86_64": "1.22.0", "aarch64": "1.23.0"}
_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def machine(raw: str | None = None) -> str:
    """The architecture's one name here: ``platform.machine()`` says ``arm64`` on macOS and
    ``AMD64`` on Windows for what Linux calls ``aarch64`` and ``x86_64``."""
    name = (raw if raw is not None else platform.machine()).lower()
    return _ALIASES.get(name, name)


def version_tuple(text: str) -> tuple[int, ...]:
    """``1.23.2`` -> (1, 23, 2); a local suffix such as ``+cpu`` or ``.dev0`` is ignored."""
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def floor_text(requirement: str) -> str:
    """``>=1.22.0`` -> ``1.22.0`` (the manifest states floors only)."""
    return requirement.strip().removeprefix(">=").strip()


def required_for(any_machine: str, by_machine: Mapping[str, str], arch: str) -> str:
    """The floor a pack states for ``arch``: its own entry, else the one for any machine."""
    return floor_text(by_machine.get(arch, any_machine))


def shortfall(
    pack: str, any_machine: str, by_machine: Mapping[str, str], installed: str, arch: str
) -> str | None:
    """Why ``installed`` cannot run the pack on ``arch`` (a sentence with the fix), or None."""
    need = required_for(any_machine, by_machine, arch)
    if version_tuple(installed) >= version_tuple(need):
        return None
    return (
        f"pack {pack} needs onnxruntime >= {need} on {arch}, this device has {installed}: "
        f"pip install 'onnxruntime>={need}'"
    )


# onnxruntime's wheels under their several distribution names (all import as onnxruntime)
_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")


def installed_onnxruntime() -> str | None:
    """The installed onnxruntime's version, read without importing it (which takes a
    second on a small board), or None where none is installed."""
    for dist in _DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def manifest_floors() -> tuple[str, dict[str, str]]:
    """What the builder writes: every measured floor by machine, and for any other machine
    (and for an agent that reads only ``runtime.onnxruntime``) the highest of them."""
    highest = max(ORT_FLOORS.values(), key=version_tuple)
    return f">={highest}", {m: f">={v}" for m, v in sorted(ORT_FLOORS.items())}
