"""The two graph flavours on one model: SmolLM2-135M built by the fused builder and by optimum.

The default GGUF's weights (dequantized, as the fused builder reads them) are written as a
Hugging Face directory; the fused builder and ``--exporter optimum`` each build an int8 pack
from that same directory; each pack is measured in its own process (``model_packs.compare``'s
measurement), the two in turn, the order swapped each round; medians with their spread. One
JSON line. Needs optimum's exporter (``make optimum``; ``EDGE_SLM_OPTIMUM_CLI``).

    python bench/flavours.py [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from agent.logs import configure_logging
from model_packs import compare
from model_packs.build.builder import BuildOptions, build_pack
from model_packs.build.export_optimum import build_optimum_pack
from model_packs.build.load import load_source
from model_packs.build.source import SourceModel, default_gguf_path
from model_packs.format import cache_root, packs_dir, read_manifest

_HF_NAMES = {
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
}


def hf_name(short: str) -> str:
    """The builder's weight name -> the Llama checkpoint's."""
    top = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}
    if short in top:
        return top[short]
    _, layer, kind = short.split(".", 2)
    return f"model.layers.{layer}.{_HF_NAMES[kind]}"


def write_hf_dir(src: SourceModel, out: Path) -> Path:
    """``src`` as a LlamaForCausalLM directory (config, safetensors, tokenizer, template)."""
    from safetensors.numpy import save_file

    c = src.config
    out.mkdir(parents=True, exist_ok=True)
    weights = {hf_name(k): np.ascontiguousarray(v) for k, v in src.weights.items()}
    save_file(weights, str(out / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_context,
        "rms_norm_eps": c.rms_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": src.bos_token_id,
        "eos_token_id": list(src.eos_token_ids),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_text(src.tokenizer_json)
    (out / "chat_template.jinja").write_text(src.chat_template)
    return out


def build_both(threads: int) -> dict[str, Path]:
    """The fused and the optimum int8 pack of the same directory, in the cache (once)."""
    source = cache_root() / "hf" / "smollm2-135m-from-gguf"
    if not (source / "config.json").is_file():
        write_hf_dir(load_source(default_gguf_path()), source)
    opts = functools.partial(
        BuildOptions, version="1.0.0", packs_dir=packs_dir(), source=source, threads=threads
    )
    return {
        "fused": build_pack(opts(name="smollm2-135m-hf-fused")),
        "optimum": build_optimum_pack(opts(name="smollm2-135m-hf-optimum")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    configure_logging("warning")
    packs = build_both(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        measured = compare.measure_packs(packs, args.rounds, args.threads, Path(tmp))
    out: dict[str, Any] = {"bench": "flavours", "rounds": args.rounds, "threads": args.threads}
    for name, pack in packs.items():
        ev = read_manifest(pack).evaluation
        row = dict(measured[name])
        row |= {"perplexity_float": round(ev.perplexity_float, 3), "top1": round(ev.top1_agreement, 4)}
        row.pop("golden_tokens", None)
        out[name] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
