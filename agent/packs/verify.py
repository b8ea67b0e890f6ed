"""Pure checks on what an update delivers (tar members, runtime floor). No IO here."""

from __future__ import annotations

import tarfile
from collections.abc import Iterable

from agent.errors import AgentError
from model_packs import runtimes
from model_packs.format import Manifest

MAX_MEMBERS = 64  # a pack is a manifest and a handful of files


class UpdateRejected(AgentError):
    """An update that must not be installed; ``reason_code`` goes into update/status."""

    code = "update_rejected"

    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code


def check_members(members: Iterable[tarfile.TarInfo], max_bytes: int) -> list[tarfile.TarInfo]:
    """Only regular files at the top level, nothing escaping, a bounded total size."""
    out, total, names = [], 0, set()
    for m in members:
        if m.name in names:
            raise UpdateRejected("bad_pack", f"tar member {m.name!r} appears twice")
        names.add(m.name)
        if len(names) > MAX_MEMBERS:
            raise UpdateRejected("bad_pack", f"pack has more than {MAX_MEMBERS} members")
        if not m.isfile() or "/" in m.name or m.name in ("", ".", ".."):
            raise UpdateRejected("bad_pack", f"tar member {m.name!r} is not a plain top-level file")
        total += m.size
        if total > max_bytes:
            raise UpdateRejected("bad_pack", f"pack unpacks to more than {max_bytes} bytes")
        out.append(m)
    if not any(m.name == "manifest.json" for m in out):
        raise UpdateRejected("bad_pack", "pack has no manifest.json at its root")
    return out


def check_runtime(manifest: Manifest, installed: str | None, arch: str) -> None:
    """The staged pack's onnxruntime floor for this machine, checked before the gate loads it:
    below the floor onnxruntime refuses the graph or fails at the first run, and that must be
    a ``runtime_mismatch`` refusal, never a crash after activation. ``installed`` None: no
    onnxruntime distribution is known here; the gate's load then says what is wrong."""
    if installed is None:
        return
    rt = manifest.runtime
    problem = runtimes.shortfall(manifest.name, rt.onnxruntime, rt.onnxruntime_by_machine, installed, arch)
    if problem is not None:
        raise UpdateRejected("runtime_mismatch", problem)
