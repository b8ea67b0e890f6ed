"""Read a base model from whichever form it comes in: a GGUF file or an HF directory.

The readers share the types in :mod:`model_packs.build.source`; this module only picks one,
so the shared types never import the readers (no import loop).
"""

from __future__ import annotations

from pathlib import Path

from model_packs.build.source import Progress, SourceModel
from model_packs.build.source_gguf import load_gguf
from model_packs.build.source_hf import load_hf_dir
from model_packs.errors import SourceModelError


def load_source(path: Path, progress: Progress | None = None) -> SourceModel:
    """Read a GGUF file or an HF directory; raises SourceModelError with the reason."""
    if not path.exists():
        raise SourceModelError(f"base model {path} does not exist")
    if path.is_dir():
        return load_hf_dir(path, progress)
    if path.suffix == ".gguf":
        return load_gguf(path, progress)
    raise SourceModelError(f"{path}: expected a .gguf file or a Hugging Face model directory")
