"""The llama.cpp side of the races (bench/engine.py, bench/quant.py), at its best settings.

Same weights: llama.cpp requantizes the GGUF our packs are built from (Q4_1 layers, Q8_0 head)
to the type raced, once, into the cache. Same work: the token ids our side feeds (the pack's
tokenizer and chat template; SmolLM2's GGUF carries the same vocabulary), the same context size
(2048), the same threads, greedy decoding of the same number of tokens with EOS ignored.
llama.cpp's own best settings: flash attention on (measured 126-130 against 116-125 tok/s off), a
batch as large as the prompt, the model memory-mapped, and the low-level loop (eval, then argmax
of the last logits read in place from the context). Greedy for real: reading ``scores`` with
``logits_all=False`` gives zeros, and argmax of zeros feeds token 0 back.

Run in its own process (``python bench/llama_side.py --gguf PATH --ids FILE``) so its resident
memory is its own; prints one JSON line in the shape of model_packs.compare.measure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from model_packs.compare import status_mb

FTYPES = ("Q4_0", "Q4_K_M", "Q8_0")
CONTEXT = 2048


def gguf_at(ftype: str) -> Path:
    """The pack's source GGUF requantized to ``ftype`` (Q4_0, Q4_K_M, Q8_0), cached."""
    import llama_cpp

    from model_packs.build.source import default_gguf_path
    from model_packs.format import cache_root

    out = cache_root() / "bench" / f"SmolLM2-135M-Instruct.{ftype}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = 2
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(default_gguf_path()).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize to {ftype} failed with {rc}")
    tmp.rename(out)
    return out


def _argmax_last(llm: Any, n_vocab: int) -> int:
    """The greedy next token: argmax of the last position's logits, read in place from the
    context (no copy, no sampler: llama.cpp's cheapest greedy step)."""
    import llama_cpp
    import numpy as np

    row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
    return int(np.argmax(row))


def _greedy(llm: Any, ids: list[int], n: int) -> tuple[list[int], float, float]:
    """(tokens, seconds to the first token, seconds for the rest) of a greedy run of ``n``.
    The low-level loop (eval, argmax in place) is llama.cpp's best from Python: measured
    146 tok/s against 131 through ``Llama.generate`` with a top-k 1 sampler (same tokens)."""
    n_vocab = llm.n_vocab()
    llm.reset()  # an empty cache, as our side (its prefix cache off)
    t0 = time.perf_counter()
    llm.eval(ids)
    out = [_argmax_last(llm, n_vocab)]
    t_first = time.perf_counter()
    while len(out) < n:
        llm.eval([out[-1]])
        out.append(_argmax_last(llm, n_vocab))
    return out, t_first - t0, time.perf_counter() - t_first


def measure(gguf: Path, threads: int, ids: dict[str, Any]) -> dict[str, Any]:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(
        model_path=str(gguf),
        n_ctx=CONTEXT,
        n_batch=CONTEXT,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=True,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    after_load = status_mb()
    short, long_ids, decode = ids["short"], ids["long"], int(ids["decode_tokens"])
    _greedy(llm, short, 4)  # warm-up
    tokens, _, rest = _greedy(llm, short, decode)
    _, first_short, _ = _greedy(llm, short, 1)
    _, first_long, _ = _greedy(llm, long_ids, 1)
    golden = [_greedy(llm, g, int(ids["golden_tokens"]))[0] for g in ids["golden"]]
    return {
        "load_s": round(load_s, 3),
        "rss_after_load_mb": after_load["VmRSS"],
        "anon_after_load_mb": after_load.get("RssAnon"),
        "peak_rss_mb": status_mb()["VmHWM"],
        "decode_tok_s": round((len(tokens) - 1) / rest, 2) if rest > 0 else 0.0,
        "prefill_short_ms": round(first_short * 1000, 1),
        "short_prompt_tokens": len(short),
        "prefill_long_ms": round(first_long * 1000, 1),
        "long_prompt_tokens": len(long_ids),
        "golden_tokens": golden,
    }


def logits_all(gguf: Path, threads: int) -> Any:
    """A second instance that keeps every position's logits (for perplexity, not for speed)."""
    from llama_cpp import Llama

    return Llama(
        model_path=str(gguf),
        n_ctx=CONTEXT,
        n_batch=CONTEXT,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        verbose=False,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--ids", type=Path, required=True, help="JSON: short, long, golden, decode/golden tokens")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    print(json.dumps(measure(args.gguf, args.threads, json.loads(args.ids.read_text()))))


if __name__ == "__main__":
    main()
