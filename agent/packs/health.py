"""Is a loaded pack healthy? Golden prompts, latency and memory, judged in one place.

The same rule serves the health gate before a switch (every golden prompt, within a
latency and memory budget relative to the active pack measured just before) and the
first probe after it (the first golden prompt). Nothing here loads or switches packs:
callers hand in an engine and get numbers or an :class:`UpdateRejected`.

Goldens are judged teacher-forced, never by replaying one greedy string: the prompt and
the token ids the build recorded are fed in one pass, and at each position the recorded
token must stay among the device's ``golden_top_k`` most likely tokens. Exact greedy
output depends on CPU features and onnxruntime version (a Pi 4 without dot-product
instructions computes 8-bit MatMulNBits in fp32 and flipped the first token of a golden
whose margin was 0.21 on x86), while a broken pack (wrong weights, wrong tokenizer,
truncated file) drops the recorded tokens far down the ranking. ``bench/golden_drift.py``
measures both sides of that line.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.packs.verify import UpdateRejected

if TYPE_CHECKING:
    from agent.inference import Engine
    from model_packs.format import Golden


@dataclass(frozen=True)
class HealthBudget:
    latency_factor: float = 3.0  # new pack's ms/token may be at most this x the active one's ...
    latency_slack_ms: float = 5.0  # ... plus this (tiny packs' timings are mostly noise)
    memory_factor: float = 2.0  # the new pack's RSS growth at load vs the active pack's ...
    memory_slack_mb: float = 64.0  # ... plus this
    golden_tokens: int = 8  # greedy tokens timed per golden prompt (latency only; both packs alike)
    # Teacher-forced, a recorded golden token must stay among the device's top_k at a share of
    # positions of at least golden_min_share (or the golden's own min_match, if higher).
    # bench/golden_drift.py on the default pack: as built and with fp32 compute (a core
    # without dot-product) every token is within the top 2; scrambled weights put none in
    # the top 5. The tokenizer is checked exactly (_check_tokenizer).
    golden_top_k: int = 5
    golden_min_share: float = 0.9


@dataclass(frozen=True)
class HealthStats:
    golden_min_agreement: float
    ms_per_token: float
    rss_growth_mb: float  # what loading the pack added to the process

    def as_dict(self) -> dict[str, float]:
        return {
            "golden_min_agreement": self.golden_min_agreement,
            "ms_per_token": self.ms_per_token,
            "rss_growth_mb": self.rss_growth_mb,
        }


def rss_mb() -> float:
    """Resident set size from /proc/self/statm (0 where there is no /proc)."""
    try:
        resident = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return resident * os.sysconf("SC_PAGE_SIZE") / 2**20


def release_memory() -> None:
    """Collect the dropped engine now and hand freed heap back to the OS: without it glibc
    keeps onnxruntime's freed arenas, and repeated reloads grew RSS from about 300 MB to over
    700 MB (agent/inference/heap.py)."""
    from agent.inference.heap import release_free_heap  # onnxruntime loads only with an engine

    gc.collect()
    release_free_heap()


def golden_agreement(engine: Engine, golden: Golden, top_k: int) -> float:
    """Teacher-forced: the share of the recorded tokens that stay among the device's
    ``top_k`` most likely next tokens, each position seeing the recorded ones before it."""
    import numpy as np  # here, not at import: the download path of an update stays light

    if not golden.token_ids:
        return 1.0
    prompt = engine.prompt_ids(golden.prompt)
    at = list(range(len(prompt) - 1, len(prompt) - 1 + len(golden.token_ids)))  # predicts each token
    rows = engine.logits_for(prompt + list(golden.token_ids), at)
    want = np.asarray(golden.token_ids)
    above = (rows > rows[np.arange(len(want)), want][:, None]).sum(axis=1)  # tokens ranked higher
    finite = np.isfinite(rows).all(axis=1)  # NaN compares false: a corrupt pack must not pass
    return float(((above < top_k) & finite).mean())


def _check_tokenizer(engine: Engine, golden: Golden) -> None:
    """Teacher forcing feeds token ids, so a wrong tokenizer would slip past it: the
    recorded ids must decode to the recorded text (exact, no floating point involved)."""
    if engine.tokenizer.decode(list(golden.token_ids)) != golden.text:
        raise UpdateRejected(
            "health_gate",
            f"golden prompt {golden.prompt!r}: the tokenizer does not decode the recorded tokens "
            "to the recorded text",
        )


def judge_goldens(engine: Engine, budget: HealthBudget, first_only: bool = False) -> float:
    """Judge the golden prompts teacher-forced; returns the worst agreement, raises when
    one agrees below ``max(min_match, golden_min_share)``."""
    golden = engine.pack.manifest.golden[:1] if first_only else engine.pack.manifest.golden
    worst = 1.0
    for g in golden:
        _check_tokenizer(engine, g)
        score = golden_agreement(engine, g, budget.golden_top_k)
        worst = min(worst, score)
        need = max(g.min_match, budget.golden_min_share)
        if score < need:
            raise UpdateRejected(
                "health_gate",
                f"golden prompt {g.prompt!r}: {score:.2f} of the recorded tokens are among this "
                f"device's top {budget.golden_top_k}, {need} needed",
            )
    return worst


def ms_per_token(engine: Engine, budget: HealthBudget) -> float:
    """Decode latency: a short greedy run of each golden prompt, timed."""
    from agent.inference import GenerationRequest  # onnxruntime: only once a pack is judged

    times = []
    for g in engine.pack.manifest.golden:
        n = max(1, min(len(g.token_ids), budget.golden_tokens))
        done = engine.generate(GenerationRequest(engine.prompt_ids(g.prompt), n))
        times.append(done.usage.total_s * 1000 / max(1, len(done.token_ids)))
    return sum(times) / max(1, len(times))


def run_goldens(engine: Engine, budget: HealthBudget, load_rss_mb: float) -> HealthStats:
    """A new pack's figures: judged (raises) and timed."""
    worst = judge_goldens(engine, budget)
    return HealthStats(worst, ms_per_token(engine, budget), load_rss_mb)


def judged(engine: Engine, budget: HealthBudget, load_rss_mb: float) -> HealthStats:
    """:func:`run_goldens`, where a pack that loads but fails to run (onnxruntime 1.22 on
    aarch64: "Only 4b quantization is supported for unpacked compute") is a refusal with a
    reason, never an exception escaping the install."""
    try:
        return run_goldens(engine, budget, load_rss_mb)
    except UpdateRejected:
        raise
    except Exception as exc:
        raise UpdateRejected("health_gate", f"pack does not run: {exc}") from None


def baseline(engine: Engine, budget: HealthBudget, load_rss_mb: float) -> HealthStats:
    """The active pack's figures for the budget: timed, not judged (it already serves)."""
    return HealthStats(1.0, ms_per_token(engine, budget), load_rss_mb)


def probe(engine: Engine, budget: HealthBudget | None = None) -> str | None:
    """First health probe of a freshly activated pack: its first golden prompt, judged
    by the same rule as the gate. Returns the failure, or None when healthy."""
    try:
        judge_goldens(engine, budget or HealthBudget(), first_only=True)
    except UpdateRejected as exc:
        return exc.message
    return None


def check_budget(new: HealthStats, active: HealthStats | None, budget: HealthBudget) -> None:
    """The new pack may be slower or bigger than the active one only within the budget;
    with no active pack to compare against, only the goldens count."""
    if active is None:
        return
    mem_limit = budget.memory_factor * active.rss_growth_mb + budget.memory_slack_mb
    if new.rss_growth_mb > mem_limit:
        raise UpdateRejected(
            "health_gate",
            f"loading the pack grew RSS by {new.rss_growth_mb:.0f} MB, over the budget of "
            f"{mem_limit:.0f} MB ({budget.memory_factor}x the active pack's + {budget.memory_slack_mb:g})",
        )
    limit = budget.latency_factor * active.ms_per_token + budget.latency_slack_ms
    if new.ms_per_token > limit:
        raise UpdateRejected(
            "health_gate",
            f"{new.ms_per_token:.1f} ms/token is over {budget.latency_factor}x the active pack's "
            f"{active.ms_per_token:.1f}",
        )


def offline_gate(
    open_engine: Callable[[Path, bool], Engine], active: Path | None, budget: HealthBudget
) -> Callable[[Path, int], dict[str, float]]:
    """The health gate where no agent serves (``edge-agent pack install``): the active pack
    is loaded once for the baseline and dropped, then the staged pack is judged."""

    def load(path: Path, hash_files: bool) -> tuple[Engine, float]:
        before = rss_mb()
        engine = open_engine(path, hash_files)
        return engine, max(0.0, rss_mb() - before)

    def measure_active() -> HealthStats | None:
        if active is None:
            return None
        try:
            engine, grew = load(active, False)
            return baseline(engine, budget, grew)
        except Exception:  # the active pack itself misbehaves: do not hold the new one to it
            return None

    def gate(staged: Path, need_mb: int) -> dict[str, float]:
        before = measure_active()  # loaded, timed and dropped before the new pack loads
        release_memory()
        try:
            engine, grew = load(staged, False)
        except Exception as exc:
            raise UpdateRejected("health_gate", f"pack does not load: {exc}") from None
        stats = judged(engine, budget, grew)
        check_budget(stats, before, budget)
        return stats.as_dict()

    return gate
