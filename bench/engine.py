"""Decode and prefill: our engine against llama.cpp, a fair race, in one run on one machine.

Prints one JSON line. Four sides, each in its own process on the same token ids
(model_packs.compare.workload: the default pack's tokenizer and chat template), the same
threads and context (2048): our int8 pack against llama.cpp Q8_0, our int4 pack against
llama.cpp Q4_0, both llama.cpp types requantized from the GGUF our packs are built from, at
llama.cpp's best settings (flash attention, a batch as large as the prompt; bench/llama_side.py)
and truly greedy on both sides. The sides run round after round in rotated order (interleaved,
so drift falls on all of them); each figure is the median over ``--rounds`` with its min..max.
Two prompts: the short greenhouse question (about 60 tokens, then 64 decoded tokens) and a long
one (about 1,500 tokens).

The bandwidth bound: every weight byte is read once per decoded token (layers and the LM head,
which for int8 is the embedding table), over the read bandwidth measured in the same run with
the same threads on a working set of that size (a pack that fits the last-level cache is read
from it), and over DRAM's (1 GB) for comparison.

    python -m bench.engine [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.logs import configure_logging
from bench import llama_side
from model_packs import compare, levels
from model_packs.format import DEFAULT_PACK_NAME, DEFAULT_PACK_VERSION, packs_dir, read_manifest


def bandwidth_gb_s(threads: int, size_bytes: int, repeats: int = 7) -> float:
    """Read bandwidth (median of ``repeats``) over a working set of ``size_bytes``: ``threads``
    threads OR-reducing disjoint parts of a uint64 array (less arithmetic per byte than a float
    sum, which measured 20 GB/s where this reads 25 from DRAM). A working set the size of a
    pack's weights is read at the speed of whatever holds it: this machine's 260 MiB L3 holds
    SmolLM2's 153 MB (41 GB/s measured against 25 for 1 GB)."""
    arr = np.ones(max(threads, size_bytes // 8), dtype=np.uint64)
    parts = np.array_split(arr, threads)
    runs = []
    for _ in range(repeats):
        workers = [threading.Thread(target=np.bitwise_or.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        runs.append(arr.nbytes / (time.perf_counter() - t0) / 1e9)
    return float(np.median(runs))


def weight_bytes_per_token(pack: Path) -> int:
    """Bytes of weights a decode step reads: the layers' file, plus the embedding table when the
    LM head shares it (an 8-bit head); a 4-bit head is its own matrix inside weights.bin."""
    m = read_manifest(pack)
    shared_head = m.quantization.method in ("int8-block32", "mixed-block32", "mixed-attn8-block32")
    return m.files["weights.bin"].length + (m.files[m.embedding.file].length if shared_head else 0)


def pack(level: str) -> Path:
    from model_packs.build.builder import BuildOptions, build_pack

    opts = BuildOptions(
        name=DEFAULT_PACK_NAME, version=DEFAULT_PACK_VERSION, packs_dir=packs_dir(), quantization=level
    )
    return build_pack(opts)


def sides(threads: int, work: Path) -> tuple[dict[str, Path], dict[str, Callable[[], dict[str, Any]]]]:
    ours = {"int8": pack(levels.resolve("int8")), "int4": pack(levels.resolve("int4"))}
    measure = compare.measure_in_subprocess
    run: dict[str, Callable[[], dict[str, Any]]] = {
        name: functools.partial(measure, path, threads, work) for name, path in ours.items()
    }
    for ftype in ("Q8_0", "Q4_0"):
        gguf = llama_side.gguf_at(ftype)
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("llama_side.py")),
            *("--gguf", str(gguf), "--ids", str(work), "--threads", str(threads)),
        ]
        run[ftype] = functools.partial(compare.run_side, cmd, f"llama.cpp {ftype}")
    return ours, run


def pair(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Ratios of medians, >1 when ours is better, with each side's own spread."""
    return {
        "decode_ratio": round(ours["decode_tok_s"] / theirs["decode_tok_s"], 3),
        "prefill_short_ratio": round(theirs["prefill_short_ms"] / ours["prefill_short_ms"], 3),
        "prefill_long_ratio": round(theirs["prefill_long_ms"] / ours["prefill_long_ms"], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    configure_logging("warning")  # stdout carries the one JSON line
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        work = Path(tmp) / "work.json"
        packs, run = sides(args.threads, work)
        work.write_text(json.dumps(compare.workload(packs["int8"], compare.golden_prompts(packs["int8"]))))
        measured = compare.run_rounds(run, args.rounds, compare.progress)
    dram = bandwidth_gb_s(args.threads, 2**30)
    keep = ("decode_tok_s", "prefill_short_ms", "prefill_long_ms", "rss_after_load_mb", "peak_rss_mb")
    out: dict[str, Any] = {
        "bench": "engine",
        "rounds": args.rounds,
        "threads": args.threads,
        "short_prompt_tokens": measured["int8"]["short_prompt_tokens"],
        "long_prompt_tokens": measured["int8"]["long_prompt_tokens"],
        "read_bandwidth_1gb_gb_s": round(dram, 2),
    }
    for name, m in measured.items():
        out[name] = {k: m[k] for k in keep} | {f"{k}_spread": m[f"{k}_spread"] for k in keep}
    for ours, theirs in (("int8", "Q8_0"), ("int4", "Q4_0")):
        out[f"{ours}_vs_{theirs}"] = pair(measured[ours], measured[theirs])
        per_token = weight_bytes_per_token(packs[ours])
        bw = bandwidth_gb_s(args.threads, per_token)  # the weights' own working set
        bound = bw * 1e9 / per_token
        out[ours] |= {
            "weight_bytes_per_token": per_token,
            "read_bandwidth_working_set_gb_s": round(bw, 2),
            "bandwidth_bound_tok_s": round(bound, 1),
            "share_of_bandwidth_bound": round(measured[ours]["decode_tok_s"] / bound, 3),
            "share_of_dram_bound": round(measured[ours]["decode_tok_s"] * per_token / (dram * 1e9), 3),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
