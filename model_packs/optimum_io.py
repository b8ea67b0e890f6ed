"""The optimum graph's inputs and outputs, shared by the device session and the evaluation.

An optimum text-generation-with-past export takes ``input_ids``, ``attention_mask``,
``position_ids`` (some families have none) and per layer ``past_key_values.{i}.key/value``
[batch, kv_heads, past, head_dim]; it returns ``logits`` for every input row and
``present.{i}.key/value``, the past with the new rows appended. Only numpy here: the device
install imports this module, the builder too, so the two feed the graph the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")


class NodeArg(Protocol):
    """What onnxruntime's ``session.get_inputs()`` items offer (typed here, not there)."""

    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> Sequence[Any]: ...


@dataclass(frozen=True)
class PastLayout:
    """Shape of the past: ``layers`` pairs of [1, kv_heads, rows, head_dim] float32 arrays."""

    layers: int
    kv_heads: int
    head_dim: int
    inputs: frozenset[str]  # every input the graph declares

    @property
    def outputs(self) -> list[str]:
        """``logits`` then the presents, in the order :meth:`past_names` lists the pasts."""
        return ["logits", *(n.replace("past_key_values", "present") for n in self.past_names())]

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    def empty(self) -> list[np.ndarray]:
        """The past before the first token: zero rows."""
        shape = (1, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.layers)]


def past_layout(inputs: Sequence[NodeArg]) -> PastLayout:
    """Read the past's layout from the graph's inputs; ValueError says what does not fit
    (a graph without ``input_ids``, a past that is not [batch, heads, rows, head_dim])."""
    names = {i.name for i in inputs}
    if INPUT_IDS not in names:
        raise ValueError(f"the graph has no {INPUT_IDS} input (inputs: {sorted(names)})")
    dims: set[tuple[int, int]] = set()
    layers: set[int] = set()
    for arg in inputs:
        found = _PAST.fullmatch(arg.name)
        if found is None:
            continue
        shape = list(arg.shape)
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise ValueError(f"{arg.name} has shape {shape}, not [batch, kv_heads, past, head_dim]")
        dims.add((shape[1], shape[3]))
        layers.add(int(found.group(1)))
    if not layers or layers != set(range(len(layers))) or len(dims) != 1:
        raise ValueError(
            f"the graph's past inputs are not one [kv_heads, head_dim] per layer: {sorted(names)}"
        )
    kv_heads, head_dim = dims.pop()
    return PastLayout(len(layers), kv_heads, head_dim, frozenset(names))


def feeds(layout: PastLayout, ids: list[int], start: int, past: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs for ``ids`` at positions ``start``.. after ``past`` (which holds ``start`` rows)."""
    n = len(ids)
    out: dict[str, np.ndarray] = {INPUT_IDS: np.asarray([ids], dtype=np.int64)}
    if ATTENTION_MASK in layout.inputs:
        out[ATTENTION_MASK] = np.ones((1, start + n), dtype=np.int64)
    if POSITION_IDS in layout.inputs:
        out[POSITION_IDS] = np.arange(start, start + n, dtype=np.int64)[None]
    out.update(zip(layout.past_names(), past, strict=True))
    return out
