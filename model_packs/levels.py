"""Quantization levels a pack can be built at, and the short names the CLI accepts.

Kept apart from the builder so the CLI (and a device install, which has no onnx) can name
and check levels without importing the build machinery.
"""

from __future__ import annotations

DEFAULT_LEVEL = "int8-block32"
LEVELS = (
    "int8-block32",
    "int4-block32",
    "mixed-block32",
    "mixed-attn8-block32",
    "int8-dynamic-per-channel",
    "int8-dynamic-per-tensor",
)
# the short names of `edge-pack build --quant`
ALIASES = {"int8": "int8-block32", "int4": "int4-block32", "mixed": "mixed-block32"}
# Width of each kind of matrix by level (8 for every level not named). Measured on SmolLM2-135M
# (its GGUF's layers are Q4_1, which the 4-bit form holds exactly; its head is Q8_0), top-1
# agreement / perplexity ratio against the float model, weights on disk:
#   int8          all 8-bit                          0.967 / 1.009   155 MB
#   int4          all 4-bit, LM head too             0.83  / 1.097   (the head's 4 bits cost it all)
#   mixed         4-bit layers, 8-bit head+embedding 0.971 / 1.004   (lossless against the source)
#   mixed-attn8   4-bit MLP, 8-bit attention+head    0.972 / 1.004   124 MB
# int4 stays all-4-bit: it is the variant for boards without dot-product instructions, where an
# 8-bit head computes in fp32.
WIDTHS: dict[str, dict[str, int]] = {
    "int4-block32": {"attention": 4, "mlp": 4, "lm_head": 4, "embedding": 8},
    "mixed-block32": {"attention": 4, "mlp": 4, "lm_head": 8, "embedding": 8},
    "mixed-attn8-block32": {"attention": 8, "mlp": 4, "lm_head": 8, "embedding": 8},
}
ALL_8BIT = {"attention": 8, "mlp": 8, "lm_head": 8, "embedding": 8}


def resolve(name: str) -> str:
    """The full level for a short or full name; ValueError names the accepted ones."""
    level = ALIASES.get(name, name)
    if level not in LEVELS:
        accepted = ", ".join([*ALIASES, *LEVELS])
        raise ValueError(f"quantization {name!r} is not one of: {accepted}")
    return level


def widths(level: str) -> dict[str, int]:
    """Bits per kind of matrix (attention, mlp, lm_head, embedding) at ``level``."""
    return dict(WIDTHS.get(level, ALL_8BIT))


def narrowest(level: str) -> int:
    """The manifest's ``bits``: the narrowest width any matrix of the level has."""
    return min(widths(level).values())
