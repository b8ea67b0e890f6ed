"""Blockwise symmetric int8 weights, laid out as onnxruntime's MatMulNBits expects.

A weight ``W[N, K]`` (out, in) is cut along K into blocks of ``block_size``; each block
gets one float32 scale (max |w| / 127) and uint8 codes with the default zero point 128.
The same codes and scales serve as the engine's embedding table for tied models.
Measured on SmolLM2-135M: per-channel dynamic int8 turns text to garbage, per-tensor
int8 doubles perplexity, blockwise 8-bit (block 32) stays within 1% of float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ZERO_POINT = 128


@dataclass(frozen=True)
class BlockQuantized:
    codes: np.ndarray  # uint8 [N, n_blocks, block_size]
    scales: np.ndarray  # float32 [N, n_blocks]

    @property
    def shape(self) -> tuple[int, int]:
        n, nb, bs = self.codes.shape
        return n, nb * bs


def quantize_blockwise(w: np.ndarray, block_size: int = 32) -> BlockQuantized:
    """Quantize rows of ``w`` in blocks of ``block_size`` (K padded with zeros)."""
    n, k = w.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, n_blocks, block_size)
    absmax = np.abs(blocks).max(axis=2)
    scales = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    q = np.rint(blocks / scales[:, :, None]).clip(-127, 127).astype(np.int16) + ZERO_POINT
    return BlockQuantized(codes=q.astype(np.uint8), scales=scales)


def dequantize_blockwise(q: BlockQuantized, k: int) -> np.ndarray:
    """Float32 view of a quantized matrix, trimmed back to ``k`` columns."""
    vals = (q.codes.astype(np.float32) - ZERO_POINT) * q.scales[:, :, None]
    return np.asarray(vals.reshape(q.codes.shape[0], -1)[:, :k])
