"""Next-token choice: greedy, temperature, top-k, top-p, repetition penalty, seeds.

A seeded ``numpy.random.Generator`` per generation makes the same seed give the same
text; greedy ignores the generator entirely.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.errors import BadRequest


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 5.0:
            raise BadRequest(f"temperature must be within 0..5, got {self.temperature}")
        if self.top_k < 0:
            raise BadRequest(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise BadRequest(f"top_p must be within (0, 1], got {self.top_p}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise BadRequest(f"repetition_penalty must be within (0, 10], got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise BadRequest(f"seed must be a non-negative 63-bit integer, got {self.seed}")


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        self._seen: set[int] = set()

    def remember(self, token_ids: list[int]) -> None:
        """Tokens the repetition penalty applies to (prompt and generated so far)."""
        self._seen.update(token_ids)

    def pick(self, logits: np.ndarray) -> int:
        p = self.params
        scores = np.asarray(logits, dtype=np.float32)
        if p.repetition_penalty != 1.0 and self._seen:
            scores = self._penalize(scores)
        if p.temperature == 0.0:
            token = int(np.argmax(scores))
        else:
            token = self._sample(scores / np.float32(p.temperature))
        self._seen.add(token)
        return token

    def _penalize(self, scores: np.ndarray) -> np.ndarray:
        out = scores.copy()
        idx = np.fromiter(self._seen, dtype=np.int64)
        vals = out[idx]
        pen = np.float32(self.params.repetition_penalty)
        out[idx] = np.where(vals > 0, vals / pen, vals * pen)
        return out

    def _sample(self, scores: np.ndarray) -> int:
        k = self.params.top_k
        cand = np.argpartition(scores, -k)[-k:] if 0 < k < scores.size else np.arange(scores.size)
        cand = cand[np.argsort(-scores[cand], kind="stable")]
        probs = np.exp(scores[cand] - scores[cand[0]])
        probs /= probs.sum()
        if self.params.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.params.top_p)) + 1
            cand, probs = cand[:keep], probs[:keep] / probs[:keep].sum()
        return int(cand[self._rng.choice(cand.size, p=probs)])
