"""A tiny Gemma 3 the tests write themselves: HF directory, random but decisive weights.

Four layers, every second one global, a sliding window of 6 tokens: sequences of 20
tokens exercise the window, both rotary bases and the per-head q/k norms. The weights
follow the Hugging Face layout and convention (norm weights ``w`` for a factor ``1 + w``),
so transformers' ``Gemma3ForCausalLM`` reads the same directory as the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from model_packs.build.source_gemma import COMPLETION_TEMPLATE
from tests.tiny_model import train_tokenizer

WINDOW = 6
CONFIG: dict[str, object] = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "sliding_window": WINDOW,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    "rope_parameters": {
        "full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    },
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "torch_dtype": "float32",
}


def random_gemma_weights(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """HF names; scales chosen so the next-token choice is clear (a flat model would let
    quantization flip every argmax)."""
    rng = np.random.default_rng(seed)
    h, inter, nh, nkv, hd, layers = 64, 128, 4, 2, 16, 4  # as CONFIG

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:  # stored as w; the model multiplies by 1 + w
        return (0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {
        "model.embed_tokens.weight": (rng.standard_normal((vocab, h)) * 0.5).astype(np.float32),
        "model.norm.weight": norm(h),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        w |= {
            p + "self_attn.q_proj.weight": mat(nh * hd, h, 2.0),
            p + "self_attn.k_proj.weight": mat(nkv * hd, h, 2.0),
            p + "self_attn.v_proj.weight": mat(nkv * hd, h, 1.0),
            p + "self_attn.o_proj.weight": mat(h, nh * hd, 2.0),
            p + "self_attn.q_norm.weight": norm(hd),
            p + "self_attn.k_norm.weight": norm(hd),
            p + "mlp.gate_proj.weight": mat(inter, h, 1.0),
            p + "mlp.up_proj.weight": mat(inter, h, 1.0),
            p + "mlp.down_proj.weight": mat(h, inter, 2.0),
            p + "input_layernorm.weight": norm(h),
            p + "post_attention_layernorm.weight": norm(h),
            p + "pre_feedforward_layernorm.weight": norm(h),
            p + "post_feedforward_layernorm.weight": norm(h),
        }
    return w


def write_gemma_dir(path: Path, seed: int = 0) -> Path:
    """config.json, tokenizer.json (the tiny BPE, with <bos>), the completion template."""
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tok.add_special_tokens(["<bos>"])
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|endoftext|>")
    cfg = dict(
        CONFIG, vocab_size=vocab, bos_token_id=tok.token_to_id("<bos>"), eos_token_id=eos, pad_token_id=0
    )
    (path / "config.json").write_text(json.dumps(cfg))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": COMPLETION_TEMPLATE}))
    save_file(random_gemma_weights(vocab, seed), str(path / "model.safetensors"))
    return path
