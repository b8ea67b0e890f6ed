"""Decode speed and prefill time: our engine vs llama.cpp on the same weights and threads.

Prints one JSON line. Each side runs in its own subprocess (so peak RSS is its own),
with the same prompt text, greedy decoding of the same number of tokens (EOS ignored)
and the same thread count. llama.cpp runs the Q8_0 requantization of the GGUF our pack
was built from. Memory bandwidth is measured in the same run, and the bandwidth bound
is (bytes of weights read per token) / bandwidth.

    python bench/engine.py [--threads 2] [--tokens 128] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = (
    "You are the assistant of a greenhouse controller. The air temperature is 27.5 C, "
    "relative humidity 81 percent and soil moisture 22 percent. Explain in a few sentences "
    "whether the vents should be opened and whether the beds need water."
)
# The same ChatML text for both sides, so both prefill the same tokens.
CHAT = f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(threads: int, tokens: int, runs: int) -> dict[str, Any]:
    from agent.inference import Engine, GenerationRequest, load_pack
    from model_packs.format import default_pack_path

    engine = Engine(load_pack(default_pack_path()), threads=threads)
    prompt = engine.tokenizer.encode(CHAT)
    rss_loaded = _peak_rss_mb()
    results = []
    for _ in range(runs + 1):  # first run warms up
        done = engine.generate(GenerationRequest(prompt, tokens, ignore_eos=True))
        results.append(done.usage)
    results = results[1:]
    return {
        "prompt_tokens": len(prompt),
        "decode_tok_s": statistics.median(u.decode_tokens_per_s for u in results),
        "prefill_s": statistics.median(u.time_to_first_token_s for u in results),
        "rss_after_load_mb": round(rss_loaded, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def q8_gguf() -> Path:
    """Requantize the pack's source GGUF to Q8_0 once, into the cache."""
    import llama_cpp

    from model_packs.build.source import default_gguf_path
    from model_packs.format import cache_root

    out = cache_root() / "bench" / "SmolLM2-135M-Instruct.Q8_0.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
        params.allow_requantize = True
        params.nthread = 2
        tmp = out.with_suffix(".tmp")
        rc = llama_cpp.llama_model_quantize(str(default_gguf_path()).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise SystemExit(f"llama_model_quantize failed with {rc}")
        tmp.rename(out)
    return out


def run_llama(threads: int, tokens: int, runs: int) -> dict[str, Any]:
    from llama_cpp import Llama

    path = q8_gguf()
    llm = Llama(
        model_path=str(path),
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=1024,
        n_batch=512,
        verbose=False,
    )
    prompt = llm.tokenize(CHAT.encode(), add_bos=False, special=True)
    rss_loaded = _peak_rss_mb()
    decode, prefill = [], []
    for _ in range(runs + 1):
        llm.reset()  # type: ignore[no-untyped-call]
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        for _ in range(tokens - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        prefill.append(t1 - t0)
        decode.append((tokens - 1) / (t2 - t1))
    return {
        "prompt_tokens": len(prompt),
        "decode_tok_s": statistics.median(decode[1:]),
        "prefill_s": statistics.median(prefill[1:]),
        "rss_after_load_mb": round(rss_loaded, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "model_bytes": path.stat().st_size,
    }


def bandwidth_gb_s(threads: int, size_mb: int = 1024) -> float:
    """Read bandwidth: ``threads`` threads summing disjoint halves of a large array."""
    arr = np.ones(size_mb * 2**20 // 8, dtype=np.float64)
    parts = np.array_split(arr, threads)
    best = 0.0
    for _ in range(3):
        workers = [threading.Thread(target=p.sum) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, arr.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def weight_bytes_per_token() -> int:
    """Every MatMulNBits weight (incl. the LM head, which is the embedding) once per token."""
    from model_packs.format import default_pack_path, read_manifest

    m = read_manifest(default_pack_path())
    return m.files["weights.bin"].length + m.files[m.embedding.file].length


def _side(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--side",
        name,
        "--threads",
        str(args.threads),
        "--tokens",
        str(args.tokens),
        "--runs",
        str(args.runs),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--side", choices=["ours", "llama"])
    args = p.parse_args()
    if args.side:
        fn = run_ours if args.side == "ours" else run_llama
        print(json.dumps(fn(args.threads, args.tokens, args.runs)))
        return
    ours, llama = _side("ours", args), _side("llama", args)
    bw = bandwidth_gb_s(args.threads)
    per_token = weight_bytes_per_token()
    bound = bw * 1e9 / per_token
    print(
        json.dumps(
            {
                "bench": "engine",
                "threads": args.threads,
                "decode_tokens": args.tokens,
                "ours_decode_tok_s": round(ours["decode_tok_s"], 1),
                "llama_cpp_q8_0_decode_tok_s": round(llama["decode_tok_s"], 1),
                "decode_ratio_vs_llama_cpp": round(ours["decode_tok_s"] / llama["decode_tok_s"], 3),
                "ours_prefill_s": round(ours["prefill_s"], 4),
                "ours_prompt_tokens": ours["prompt_tokens"],
                "llama_cpp_prefill_s": round(llama["prefill_s"], 4),
                "llama_cpp_prompt_tokens": llama["prompt_tokens"],
                "prefill_ratio_vs_llama_cpp": round(ours["prefill_s"] / llama["prefill_s"], 3),
                "read_bandwidth_gb_s": round(bw, 2),
                "weight_bytes_per_token": per_token,
                "bandwidth_bound_tok_s": round(bound, 1),
                "ours_share_of_bandwidth_bound": round(ours["decode_tok_s"] / bound, 3),
                "ours_peak_rss_mb": ours["peak_rss_mb"],
                "ours_rss_after_load_mb": ours["rss_after_load_mb"],
                "llama_cpp_peak_rss_mb": llama["peak_rss_mb"],
            }
        )
    )


if __name__ == "__main__":
    main()
