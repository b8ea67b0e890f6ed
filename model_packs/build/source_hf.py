"""Hugging Face model directories (config.json + safetensors + tokenizer.json).

Gemma 3 directories (``Gemma3ForCausalLM``) store RMSNorm weights as ``w`` for a norm that
multiplies by ``1 + w``; the reader adds the one, so every source hands the graph factors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from model_packs.build.source import ModelConfig, Progress, SourceModel, read_safetensors
from model_packs.errors import SourceModelError

_GEMMA3 = "Gemma3ForCausalLM"
_SUPPORTED = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", _GEMMA3}
_LAYER = {
    "self_attn.q_proj.weight": "q",
    "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o",
    "self_attn.q_proj.bias": "q_bias",
    "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.bias": "v_bias",
    "mlp.gate_proj.weight": "gate",
    "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down",
    "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "mlp_norm",
}
# Gemma's names: its post_attention_layernorm is the attention output's own norm
_GEMMA_LAYER = {
    **_LAYER,
    "post_attention_layernorm.weight": "post_attn_norm",
    "pre_feedforward_layernorm.weight": "mlp_norm",
    "post_feedforward_layernorm.weight": "post_mlp_norm",
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise SourceModelError(f"{path} is not valid JSON: {exc}") from None


def _config(raw: dict[str, Any]) -> ModelConfig:
    archs = set(raw.get("architectures") or [])
    if not archs & _SUPPORTED:
        raise SourceModelError(f"architecture {sorted(archs)} is not supported: {sorted(_SUPPORTED)}")
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    is_qwen = "Qwen2ForCausalLM" in archs
    cfg = ModelConfig(
        hidden_size=hidden,
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        intermediate_size=int(raw["intermediate_size"]),
        vocab_size=int(raw["vocab_size"]),
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        rms_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_context=int(raw.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", is_qwen)),
    )
    return _gemma3_config(cfg, raw) if _GEMMA3 in archs else cfg


def _gemma3_config(cfg: ModelConfig, raw: dict[str, Any]) -> ModelConfig:
    """Gemma 3's extra fields from its config.json (transformers 4.5x and 5.x spellings)."""
    if raw.get("final_logit_softcapping") or raw.get("attn_logit_softcapping"):
        raise SourceModelError("Gemma logit soft-capping is not supported (Gemma 3 has none)")
    rope = raw.get("rope_parameters") or {}
    local, full = rope.get("sliding_attention") or {}, rope.get("full_attention") or {}
    if full.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
        raise SourceModelError("scaled rotary embeddings are not supported (Gemma 3 270M and 1B have none)")
    local_theta = local.get("rope_theta", raw.get("rope_local_base_freq", 10000.0))
    global_theta = full.get("rope_theta", raw.get("rope_theta", 1000000.0))
    scalar = float(raw.get("query_pre_attn_scalar") or cfg.head_dim)
    return dataclasses.replace(
        cfg,
        rope_theta=float(global_theta),
        tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
        activation="gelu_tanh",
        embed_scale=math.sqrt(cfg.hidden_size),
        qk_norm=True,
        post_norms=True,
        query_scale=1.0 / math.sqrt(scalar),
        sliding_window=int(raw.get("sliding_window") or 0),
        global_every=_global_every(raw),
        rope_local_theta=float(local_theta),
    )


def _global_every(raw: dict[str, Any]) -> int:
    """Gemma's layer pattern as "every n-th layer is global"; any other pattern is refused."""
    types = raw.get("layer_types")
    if not types:
        return int(raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6)
    n = types.index("full_attention") + 1 if "full_attention" in types else 0
    want = ["full_attention" if n and (i + 1) % n == 0 else "sliding_attention" for i in range(len(types))]
    if types != want:
        raise SourceModelError(f"layer_types {types} is not 'every n-th layer global'")
    return n


def _rename(hf: dict[str, np.ndarray], gemma: bool) -> dict[str, np.ndarray]:
    layer_names = _GEMMA_LAYER if gemma else _LAYER
    out: dict[str, np.ndarray] = {}
    for name, w in hf.items():
        if name == "model.embed_tokens.weight":
            out["embed"] = w
        elif name == "model.norm.weight":
            out["norm"] = w + 1.0 if gemma else w
        elif name == "lm_head.weight":
            out["lm_head"] = w
        elif name.startswith("model.layers."):
            idx, rest = name.removeprefix("model.layers.").split(".", 1)
            if rest in layer_names:
                short = layer_names[rest]
                out[f"layers.{idx}.{short}"] = w + 1.0 if gemma and short.endswith("norm") else w
        # anything else (rotary inv_freq buffers, ...) is derived, not a weight
    return out


def _safetensor_files(path: Path) -> list[Path]:
    index = _read_json(path / "model.safetensors.index.json")
    if index:
        return sorted({path / f for f in index["weight_map"].values()})
    single = path / "model.safetensors"
    if not single.is_file():
        raise SourceModelError(f"{path} has no model.safetensors (only safetensors weights are read)")
    return [single]


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def load_hf_dir(path: Path, progress: Progress | None = None) -> SourceModel:
    raw = _read_json(path / "config.json")
    if raw is None:
        raise SourceModelError(f"{path} has no config.json: not a Hugging Face model directory")
    cfg = _config(raw)
    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        raise SourceModelError(f"{path} has no tokenizer.json (a fast tokenizer is required)")
    files = _safetensor_files(path)
    weights: dict[str, np.ndarray] = {}
    for i, f in enumerate(files):
        weights.update(_rename(read_safetensors(f), cfg.activation == "gelu_tanh"))
        if progress:
            progress(i + 1, len(files))
    if cfg.tie_embeddings:
        weights.pop("lm_head", None)
    tok_cfg = _read_json(path / "tokenizer_config.json") or {}
    template_file = path / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else tok_cfg.get("chat_template", "")
    gen = _read_json(path / "generation_config.json") or {}
    eos = gen.get("eos_token_id", raw.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
    return SourceModel(
        name=path.name,
        license=str(raw.get("license", "unknown")),
        origin=str(path),
        sha256=_digest([*files, path / "config.json", tok_path]),
        config=cfg,
        weights=weights,
        tokenizer_json=tok_path.read_text(),
        chat_template=str(template or ""),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        add_bos=bool(tok_cfg.get("add_bos_token", cfg.activation == "gelu_tanh"))
        and raw.get("bos_token_id") is not None,
    )
