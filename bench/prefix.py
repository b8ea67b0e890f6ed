"""Time to first token of grounded queries with and without prompt-prefix reuse.

Prints one JSON line. Two engines on the default pack in this process, one reusing the rows
its previous prompt left in the KV cache (the default) and one computing every prompt from
its first token; each query goes to both, in alternating order, so drift and noise fall on
both sides alike. The queries are what the agent sends (its default system prompt, the chat
template, the facts sentences of agent/answers/prompt.py's form, the question): readings that
move a little between queries, other questions, and the retry of the same facts.

Figures per kind of query: the median time to first token with its p10..p90 spread for each
side, the median ratio (off / on) and the tokens the cache held.

    python bench/prefix.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from typing import Any

from agent.config import PromptConfig
from agent.inference import Engine, GenerationRequest, load_pack
from model_packs.format import default_pack_path

QUESTIONS = (
    "Is it too hot in the greenhouse?",
    "Does bed 2 need water?",
    "What is the humidity?",
    "Should the vents be opened?",
)


def facts(rng: random.Random) -> str:
    """A facts block like agent/answers/prompt.py writes, readings drifting between queries."""
    temp, hum, soil = 27.4 + rng.uniform(-0.4, 0.4), 78 + rng.uniform(-2, 2), 21 + rng.uniform(-1, 1)
    return (
        f"Sensor readings: air temperature is {temp:.1f} °C, above the 26 °C limit (too hot). "
        f"relative humidity is {hum:.0f} %, within 60..85 % (ok). "
        f"soil moisture is {soil:.1f} %, below the 25 % limit (too dry)."
    )


def user_message(block: str, question: str) -> str:
    return f"{block}\n\nQuestion: {question}"


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def _ttft(engine: Engine, ids: list[int]) -> tuple[float, int]:
    done = engine.generate(GenerationRequest(ids, 1))
    return done.usage.time_to_first_token_s, done.usage.cached_prompt_tokens


def run(rounds: int, threads: int) -> dict[str, Any]:
    pack = load_pack(default_pack_path())
    on = Engine(pack, threads=threads)
    off = Engine(pack, threads=threads, prefix_cache=False)
    system = PromptConfig().system
    rng = random.Random(0)
    times: dict[str, dict[str, list[float]]] = {}
    held: dict[str, list[int]] = {}
    prompt_tokens: dict[str, list[int]] = {}
    block = facts(rng)
    for r in range(rounds * len(QUESTIONS)):
        question = QUESTIONS[r % len(QUESTIONS)]
        kinds = {
            "new_readings": user_message(block := facts(rng), question),  # the typical query
            "same_readings": user_message(block, QUESTIONS[(r + 1) % len(QUESTIONS)]),
            "retry": user_message(block, QUESTIONS[(r + 1) % len(QUESTIONS)])
            + '\nAnswer in one sentence that starts exactly with: "Yes".',
        }
        for kind, text in kinds.items():
            ids = on.prompt_ids(text, system)
            sides = [("on", on), ("off", off)] if r % 2 else [("off", off), ("on", on)]
            for side, engine in sides:
                t, cached = _ttft(engine, ids)
                times.setdefault(kind, {}).setdefault(side, []).append(t)
                if side == "on":
                    held.setdefault(kind, []).append(cached)
            prompt_tokens.setdefault(kind, []).append(len(ids))
    out: dict[str, Any] = {"bench": "prefix", "rounds": rounds, "threads": threads}
    for kind, by_side in times.items():
        ratios = [a / b for a, b in zip(by_side["off"], by_side["on"], strict=True)]
        out[kind] = {
            "prompt_tokens": statistics.median(prompt_tokens[kind]),
            "cached_tokens": statistics.median(held[kind]),
            **{
                f"ttft_ms_{side}": {
                    "median": round(statistics.median(v) * 1000, 1),
                    "p10": round(_pct(v, 0.1) * 1000, 1),
                    "p90": round(_pct(v, 0.9) * 1000, 1),
                }
                for side, v in by_side.items()
            },
            "speedup_median": round(statistics.median(ratios), 2),
            "speedup_p10_p90": [round(_pct(ratios, 0.1), 2), round(_pct(ratios, 0.9), 2)],
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    print(json.dumps(run(args.rounds, args.threads)))


if __name__ == "__main__":
    main()
