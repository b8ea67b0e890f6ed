"""The session for packs that carry an optimum-exported graph (manifest ``graph: optimum``).

The fused graph (engine.py) keeps its KV cache in preallocated buffers that
GroupQueryAttention writes in place; an optimum export instead takes the past as inputs and
returns it, one row longer, as ``present.*``. So this session keeps the presents of the last
pass as the next pass's past: rows ``0..start`` are reused, anything after ``start`` is
dropped first (the engine's prompt-prefix reuse asks for exactly that). The embedding and
the LM head live inside the graph, so ``input_ids`` go in and every row's logits come out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from model_packs.optimum_io import PastLayout, feeds, past_layout


class OptimumGraph:
    """One onnxruntime session over an optimum graph, and the past it has computed."""

    def __init__(self, model_path: Path, threads: int, providers: list[str]) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(str(model_path), opts, providers=providers)
        self.layout: PastLayout = past_layout(self._session.get_inputs())
        self._past = self.layout.empty()

    @property
    def rows(self) -> int:
        """How many positions the kept past holds."""
        return int(self._past[0].shape[2])

    def forward(self, ids: list[int], start: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Run ``ids`` at positions ``start``.. after the first ``start`` rows of the kept past;
        return logits [len(rows), vocab] for the chosen rows of ``ids`` (default: the last)."""
        if not 0 <= start <= self.rows:
            raise ValueError(f"start {start} is beyond the {self.rows} rows the past holds")
        past = [p[:, :, :start] for p in self._past] if start < self.rows else self._past
        self._past = past  # a failed pass leaves rows 0..start, as the fused buffers do
        out = self._session.run(self.layout.outputs, feeds(self.layout, ids, start, past))
        self._past = list(out[1:])
        logits = np.asarray(out[0][0])
        wanted = np.array([len(ids) - 1]) if rows is None else rows
        return np.asarray(logits[wanted])
