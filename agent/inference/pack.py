"""Load a model pack for serving: manifest, file hashes, runtime version and RAM.

Each check raises a :mod:`model_packs.errors` error with its own code and a message that
says what to do, so a bad pack never reaches onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model_packs import runtimes
from model_packs.errors import RuntimeRequirementError
from model_packs.format import Embedding, Manifest, read_manifest, verify_pack


@dataclass(frozen=True)
class LoadedPack:
    path: Path
    manifest: Manifest
    chat_template: str
    tokenizer_json: str
    embedding: EmbeddingTable

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file


def check_runtime(manifest: Manifest, available_mb: int | None) -> None:
    """Raise when this onnxruntime or this machine cannot run the pack."""
    check_onnxruntime(manifest, ort.__version__)
    missing = set(manifest.runtime.execution_providers) - set(ort.get_available_providers())
    if missing:
        raise RuntimeRequirementError(f"pack needs execution providers {sorted(missing)}, not available here")
    if available_mb is not None and available_mb < manifest.runtime.min_ram_mb:
        raise RuntimeRequirementError(
            f"pack {manifest.name} needs {manifest.runtime.min_ram_mb} MB of free RAM, "
            f"{available_mb} MB are available"
        )


def check_onnxruntime(manifest: Manifest, installed: str, arch: str | None = None) -> None:
    """Raise ``runtime_mismatch`` when ``installed`` is below the pack's floor for this
    machine (an older onnxruntime refuses the graph or fails at the first run)."""
    rt = manifest.runtime
    problem = runtimes.shortfall(
        manifest.name, rt.onnxruntime, rt.onnxruntime_by_machine, installed, arch or runtimes.machine()
    )
    if problem is not None:
        raise RuntimeRequirementError(problem)


def available_ram_mb() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class EmbeddingTable:
    """The int8 token-embedding table, memory-mapped; rows are dequantized on demand
    (one row per token: the same bytes serve as the tied LM head's weights)."""

    codes: np.ndarray  # uint8 [vocab, n_blocks, block]
    scales: np.ndarray  # float32 [vocab, n_blocks]
    zero_point: int
    cols: int

    @classmethod
    def open(cls, pack_dir: Path, e: Embedding) -> EmbeddingTable:
        n_blocks = -(-e.cols // e.block_size)
        path = pack_dir / e.file
        codes = np.memmap(path, np.uint8, "r", e.codes_offset, (e.rows, n_blocks, e.block_size))
        scales = np.memmap(path, np.float32, "r", e.scales_offset, (e.rows, n_blocks))
        return cls(codes, scales, e.zero_point, e.cols)

    def rows(self, ids: list[int]) -> np.ndarray:
        """Float32 rows for ``ids``: [len(ids), cols]."""
        idx = np.asarray(ids, dtype=np.int64)
        out = self.codes[idx].astype(np.float32) - np.float32(self.zero_point)
        out *= self.scales[idx][:, :, None]
        return np.asarray(out.reshape(len(ids), -1)[:, : self.cols])


def load_pack(
    path: Path, available_mb: int | None = None, check_ram: bool = True, hash_files: bool = True
) -> LoadedPack:
    """Verify a pack directory and map its embedding table; no onnxruntime session yet.
    ``hash_files=False`` only for a pack whose files the caller has just verified."""
    manifest = verify_pack(path) if hash_files else read_manifest(path)
    if check_ram:
        check_runtime(manifest, available_mb if available_mb is not None else available_ram_mb())
    else:
        check_runtime(manifest, None)
    return LoadedPack(
        path=path,
        manifest=manifest,
        chat_template=(path / manifest.tokenizer.chat_template_file).read_text(),
        tokenizer_json=(path / manifest.tokenizer.file).read_text(),
        embedding=EmbeddingTable.open(path, manifest.embedding),
    )
