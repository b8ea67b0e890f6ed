"""An independent numpy Llama forward pass: the yardstick for the builder's ONNX graph."""

from __future__ import annotations

import numpy as np

from model_packs.build.source import ModelConfig


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return np.asarray(x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w)


def _rope(x: np.ndarray, theta: float) -> np.ndarray:
    """HF rotary: rotate the first half of each head against the second half."""
    seq, _, d = x.shape
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    f = np.outer(np.arange(seq), inv)
    cos, sin = np.cos(f)[:, None, :], np.sin(f)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, group: int) -> np.ndarray:
    seq, heads, d = q.shape
    out = np.zeros_like(q)
    mask = np.triu(np.full((seq, seq), -np.inf), 1)
    for h in range(heads):
        s = q[:, h] @ k[:, h // group].T / np.sqrt(d) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, h // group]
    return out


def forward(w: dict[str, np.ndarray], cfg: ModelConfig, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] in float64."""
    x = w["embed"][ids].astype(np.float64)
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        n = _rms(x, w[p + "attn_norm"], cfg.rms_eps)
        q = _rope((n @ w[p + "q"].T).reshape(len(ids), nh, hd), cfg.rope_theta)
        k = _rope((n @ w[p + "k"].T).reshape(len(ids), nkv, hd), cfg.rope_theta)
        v = (n @ w[p + "v"].T).reshape(len(ids), nkv, hd)
        x = x + _attention(q, k, v, nh // nkv).reshape(len(ids), -1) @ w[p + "o"].T
        n = _rms(x, w[p + "mlp_norm"], cfg.rms_eps)
        gate = n @ w[p + "gate"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (n @ w[p + "up"].T)) @ w[p + "down"].T
    head = w.get("lm_head", w["embed"])
    return np.asarray(_rms(x, w["norm"], cfg.rms_eps) @ head.T)
