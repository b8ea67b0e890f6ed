"""GGUF base models (llama.cpp's format): dequantize weights, rebuild tokenizer.json.

llama.cpp permutes q/k rows for its interleaved rotary; we undo that so a GGUF and the
HF directory of the same model give identical weights. The tokenizer is rebuilt from
the GGUF vocabulary, merges and pre-tokenizer name with the ``tokenizers`` library
(Gemma's SentencePiece vocabulary: see :mod:`model_packs.build.source_gemma`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from model_packs.build import source_gemma
from model_packs.build.source import (
    ModelConfig,
    Progress,
    SourceModel,
    unpermute_rotary,
)
from model_packs.errors import SourceModelError
from model_packs.fileio import sha256_file

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LAYER_NAMES = {
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
    "attn_norm": "attn_norm",
    "ffn_norm": "mlp_norm",
    "attn_q_norm": "q_norm",
    "attn_k_norm": "k_norm",
    "post_attention_norm": "post_attn_norm",
    "post_ffw_norm": "post_mlp_norm",
    "attn_q.bias": "q_bias",
    "attn_k.bias": "k_bias",
    "attn_v.bias": "v_bias",
}
_CONTROL, _USER_DEFINED = 3, 4
_ARCHS = ("llama", "qwen2", "gemma3")


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise SourceModelError(f"GGUF metadata {key} is missing")
        return default
    return f.contents()


def _config(reader: Any, arch: str) -> ModelConfig:
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    names = {t.name for t in reader.tensors}
    head_dim = _field(reader, f"{arch}.attention.key_length", hidden // heads)
    cfg = ModelConfig(
        hidden_size=hidden,
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.rope.dimension_count", head_dim)),
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        max_context=int(_field(reader, f"{arch}.context_length")),
        tie_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
    )
    if arch == "gemma3":
        if reader.fields.get(f"{arch}.rope.scaling.factor") is not None:
            raise SourceModelError("scaled rotary embeddings are not supported (Gemma 3 270M has none)")
        window = int(_field(reader, f"{arch}.attention.sliding_window"))
        return dataclasses.replace(cfg, **source_gemma.gemma3_features(cfg, window))
    return cfg


def _weight_name(gguf_name: str) -> str | None:
    if gguf_name == "token_embd.weight":
        return "embed"
    if gguf_name == "output_norm.weight":
        return "norm"
    if gguf_name == "output.weight":
        return "lm_head"
    parts = gguf_name.split(".")
    if parts[0] != "blk":
        return None
    key = ".".join(parts[2:]).removesuffix(".weight")
    short = _LAYER_NAMES.get(key)
    return f"layers.{parts[1]}.{short}" if short else None


def _weights(
    reader: Any, cfg: ModelConfig, permuted: bool, progress: Progress | None
) -> dict[str, np.ndarray]:
    """Dequantize every tensor; ``permuted``: llama.cpp reordered q/k rows (llama arch)."""
    from gguf import quants

    out: dict[str, np.ndarray] = {}
    tensors = list(reader.tensors)
    for i, t in enumerate(tensors):
        name = _weight_name(t.name)
        if name is None:
            raise SourceModelError(f"GGUF tensor {t.name} is not part of a Llama/Qwen/Gemma 3 model")
        w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if permuted and name.endswith((".q", ".q_bias")):
            w = unpermute_rotary(w, cfg.num_heads)
        elif permuted and name.endswith((".k", ".k_bias")):
            w = unpermute_rotary(w, cfg.num_kv_heads)
        out[name] = w
        if progress:
            progress(i + 1, len(tensors))
    return out


def _pre_tokenizer(pre: str) -> Any:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    patterns = {
        "gpt2": [_GPT2_SPLIT],
        "default": [_GPT2_SPLIT],
        "smollm": [r"\p{N}", _GPT2_SPLIT],
        "qwen2": [_QWEN2_SPLIT],
        "llama-bpe": [_LLAMA3_SPLIT],
        "llama3": [_LLAMA3_SPLIT],
    }
    if pre not in patterns:
        raise SourceModelError(f"GGUF pre-tokenizer {pre!r} is not supported: {sorted(patterns)}")
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in patterns[pre]]
    return pre_tokenizers.Sequence([*splits, byte_level])


def _merge_pair(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep:
        raise SourceModelError(f"GGUF merge {merge!r} is not 'left right'")
    return left, right


def build_tokenizer_json(reader: Any) -> str:
    """Rebuild the ``tokenizer.json`` from the GGUF vocabulary: byte-level BPE (``gpt2``) or
    SentencePiece BPE (``llama``: scores, byte fallback)."""
    model = _field(reader, "tokenizer.ggml.model")
    if model == "llama":
        return source_gemma.spm_tokenizer_json(
            [str(t) for t in _field(reader, "tokenizer.ggml.tokens")],
            [float(x) for x in _field(reader, "tokenizer.ggml.scores")],
            [int(k) for k in _field(reader, "tokenizer.ggml.token_type")],
            int(_field(reader, "tokenizer.ggml.unknown_token_id", 0)),
        )
    if model != "gpt2":
        raise SourceModelError(f"GGUF tokenizer model {model!r} is not supported (gpt2, llama)")
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [_merge_pair(str(m)) for m in _field(reader, "tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(str(_field(reader, "tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types, strict=True)
        if int(kind) in (_CONTROL, _USER_DEFINED)
    ]
    tok.add_special_tokens(special)
    return str(tok.to_str())


def load_gguf(path: Path, progress: Progress | None = None) -> SourceModel:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct errors on junk files
        raise SourceModelError(f"{path} is not a readable GGUF file: {exc}") from None
    arch = str(_field(reader, "general.architecture"))
    if arch not in _ARCHS:
        raise SourceModelError(f"GGUF architecture {arch!r} is not supported {_ARCHS}")
    cfg = _config(reader, arch)
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    bos = reader.fields.get("tokenizer.ggml.bos_token_id")
    template = str(_field(reader, "tokenizer.chat_template", ""))
    eos_ids: tuple[int, ...] = (eos,)
    if arch == "gemma3" and not template:  # the pretrained model: a completion prompt
        template = source_gemma.COMPLETION_TEMPLATE
        eos_ids = source_gemma.stop_token_ids([str(t) for t in _field(reader, "tokenizer.ggml.tokens")], eos)
    return SourceModel(
        name=str(_field(reader, "general.name", path.stem)),
        license=str(_field(reader, "general.license", "unknown")),
        origin=str(path),
        sha256=sha256_file(path),
        config=cfg,
        weights=_weights(reader, cfg, arch == "llama", progress),
        tokenizer_json=build_tokenizer_json(reader),
        chat_template=template,
        bos_token_id=int(bos.contents()) if bos is not None else None,
        eos_token_ids=eos_ids,
        add_bos=bos is not None and bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    )
