"""Hugging Face model directories (config.json + safetensors + tokenizer.json)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from model_packs.build.source import ModelConfig, Progress, SourceModel, read_safetensors
from model_packs.errors import SourceModelError

_SUPPORTED = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}
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
    return ModelConfig(
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


def _rename(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, w in hf.items():
        if name == "model.embed_tokens.weight":
            out["embed"] = w
        elif name == "model.norm.weight":
            out["norm"] = w
        elif name == "lm_head.weight":
            out["lm_head"] = w
        elif name.startswith("model.layers."):
            idx, rest = name.removeprefix("model.layers.").split(".", 1)
            if rest in _LAYER:
                out[f"layers.{idx}.{_LAYER[rest]}"] = w
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
        weights.update(_rename(read_safetensors(f)))
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
    )
