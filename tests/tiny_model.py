"""A tiny Llama the tests build themselves in about a second: tokenizer, weights, HF dir.

Random weights, but scaled so the model's next-token choices are decisive (a flat
random model would make quantization flip every argmax and the quality gate moot).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = (
    "The greenhouse temperature is 21.5 degrees and the humidity is 64 percent. "
    "Soil moisture reads 31 percent in bed two. Température élevée, humidité normale. "
    "温度は二十一度です。 The sensor says 🌡 22 °C and 💧 60 %. "
) * 20

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def train_tokenizer(vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    return tok


def random_weights(
    cfg: dict[str, int | float | bool | str | list[str]], vocab: int, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    nh, nkv, hd = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"]), int(cfg["head_dim"])

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    w = {
        "model.embed_tokens.weight": (rng.standard_normal((vocab, h)) * 1.0).astype(np.float32),
        "model.norm.weight": np.ones(h, np.float32),
        "lm_head.weight": mat(vocab, h, 4.0),
    }
    for i in range(int(cfg["num_hidden_layers"])):
        p = f"model.layers.{i}."
        w |= {
            p + "self_attn.q_proj.weight": mat(nh * hd, h, 2.0),
            p + "self_attn.k_proj.weight": mat(nkv * hd, h, 2.0),
            p + "self_attn.v_proj.weight": mat(nkv * hd, h, 1.0),
            p + "self_attn.o_proj.weight": mat(h, nh * hd, 4.0),
            p + "mlp.gate_proj.weight": mat(inter, h, 1.0),
            p + "mlp.up_proj.weight": mat(inter, h, 1.0),
            p + "mlp.down_proj.weight": mat(h, inter, 4.0),
            p + "input_layernorm.weight": (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32),
            p + "post_attention_layernorm.weight": (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32),
        }
    return w


def write_hf_dir(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    vocab = tok.get_vocab_size()
    cfg = dict(CONFIG, vocab_size=vocab, bos_token_id=None, eos_token_id=tok.token_to_id("<|im_end|>"))
    (path / "config.json").write_text(json.dumps(cfg))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    save_file(random_weights(cfg, vocab, seed), str(path / "model.safetensors"))
    return path
