"""Quantization levels side by side: our packs and llama.cpp on the same GGUF, one run.

Prints one JSON line (every row with its medians and spreads); ``--table FILE`` also writes the
markdown table the README shows, ``--png FILE`` the chart. Rows:

- our packs built from the default source at ``int8``, ``mixed`` and ``int4`` (built into the
  cache first when missing, each through its own gate);
- llama.cpp (llama-cpp-python, the ``bench`` extra) on that GGUF requantized to Q8_0, Q4_K_M and
  Q4_0, at its best settings (bench/llama_side.py).

Every side runs in its own process on the same token ids (model_packs.compare.workload), round
after round in rotated order; figures are medians over the rounds. Perplexity and top-1 agreement
are against the float model (the GGUF's weights dequantized, the builder's float graph) on the
held-out text the builder's gate uses, the same chunks: for our packs from their build's
evaluation, for llama.cpp computed here from its logits. Golden agreement is against the int8
pack's greedy tokens.

    python -m bench.quant [--rounds 3] [--threads 2] [--table quant.md] [--png quant.png]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.logs import configure_logging
from bench import llama_side
from model_packs import compare, levels
from model_packs.format import DEFAULT_PACK_NAME, DEFAULT_PACK_VERSION, default_pack_path, packs_dir

LEVELS = ("int8", "mixed", "int4")


def our_packs() -> dict[str, Path]:
    """The default pack at each level, built when missing."""
    from model_packs.build.builder import BuildOptions, build_pack

    out = {}
    for name in LEVELS:
        opts = BuildOptions(
            name=DEFAULT_PACK_NAME,
            version=DEFAULT_PACK_VERSION,
            packs_dir=packs_dir(),
            quantization=levels.resolve(name),
        )
        out[name] = build_pack(opts)
    return out


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    logz = np.log(np.exp(shifted).sum(axis=1))
    return np.asarray(logz - shifted[np.arange(len(targets)), targets], dtype=np.float64)


def float_logits(threads: int, parts: list[list[int]]) -> list[np.ndarray]:
    """The float model's logits on each chunk (the builder's float graph of the same GGUF)."""
    from model_packs.build.evaluate import GraphRunner
    from model_packs.build.graph import MODEL_FILE, GraphOptions, write_graph
    from model_packs.build.load import load_source
    from model_packs.build.source import default_gguf_path

    src = load_source(default_gguf_path())
    with tempfile.TemporaryDirectory(prefix="float-") as tmp:
        write_graph(src, Path(tmp), GraphOptions(quantized=False))
        embed = src.weights["embed"]
        runner = GraphRunner(Path(tmp) / MODEL_FILE, src.config, lambda t: embed[t], threads)
        return [runner.logits(p)[:-1] for p in parts]


def heldout_parts() -> list[list[int]]:
    """The builder's held-out tokens and chunks (1,024 tokens, chunks of 256)."""
    from tokenizers import Tokenizer

    from model_packs.build.evaluate import chunks, heldout_text

    tok = Tokenizer.from_str((default_pack_path() / "tokenizer.json").read_text())
    ids = tok.encode(heldout_text(), add_special_tokens=False).ids[:1024]
    return chunks(list(ids), 256)


def llama_quality(
    gguf: Path, threads: int, parts: list[list[int]], ref: list[np.ndarray]
) -> dict[str, float]:
    """llama.cpp's perplexity and top-1 agreement with the float model, teacher-forced."""
    llm = llama_side.logits_all(gguf, threads)
    agree = count = 0
    nll = 0.0
    for part, lf in zip(parts, ref, strict=True):
        llm.reset()
        llm.eval(part)
        lq = np.asarray(llm.scores[: len(part)], dtype=np.float32)[:-1]
        targets = np.asarray(part[1:], dtype=np.int64)
        agree += int((lf.argmax(axis=1) == lq.argmax(axis=1)).sum())
        nll += float(_nll(lq, targets).sum())
        count += len(targets)
    return {"ppl": round(float(np.exp(nll / count)), 3), "top1": round(agree / count, 4)}


def llama_row(ftype: str, gguf: Path) -> dict[str, Any]:
    return {
        "name": f"llama.cpp {ftype}",
        "kind": "llama.cpp",
        "level": ftype,
        "size_mb": round(gguf.stat().st_size / 1e6, 1),  # MB, as the packs
    }


def run(rounds: int, threads: int) -> list[dict[str, Any]]:
    packs = our_packs()
    ggufs = {f: llama_side.gguf_at(f) for f in ("Q8_0", "Q4_K_M", "Q4_0")}
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        work = Path(tmp) / "work.json"
        first = packs["int8"]
        work.write_text(json.dumps(compare.workload(first, compare.golden_prompts(first))))
        sides: dict[str, Callable[[], dict[str, Any]]] = {
            name: functools.partial(compare.measure_in_subprocess, path, threads, work)
            for name, path in packs.items()
        }
        for ftype, gguf in ggufs.items():
            cmd = [
                sys.executable,
                str(Path(__file__).with_name("llama_side.py")),
                "--gguf",
                str(gguf),
                "--ids",
                str(work),
                "--threads",
                str(threads),
            ]
            sides[ftype] = functools.partial(compare.run_side, cmd, f"llama.cpp {ftype}")
        measured = compare.run_rounds(sides, rounds, compare.progress)
    parts = heldout_parts()
    ref = float_logits(threads, parts)
    rows = [{**compare.pack_row(path), **measured[name]} for name, path in packs.items()]
    vocab = rows[0]["tokenizer"]  # the GGUF carries the same vocabulary: golden tokens compare
    for ftype, gguf in ggufs.items():
        compare.progress(f"llama.cpp {ftype}: perplexity against float")
        quality = llama_quality(gguf, threads, parts, ref)
        rows.append({**llama_row(ftype, gguf), "tokenizer": vocab, **measured[ftype], **quality})
    return compare.with_golden_agreement(rows)


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Decode and prefill ratios of the like-for-like pairs (ours / llama.cpp)."""
    by = {r["level"]: r for r in rows}
    out = {}
    for ours, theirs in (("int8-block32", "Q8_0"), ("int4-block32", "Q4_0"), ("mixed-block32", "Q4_0")):
        a, b = by[ours], by[theirs]
        tag = f"{ours.split('-')[0]}_vs_{theirs}"
        out[f"decode_{tag}"] = round(a["decode_tok_s"] / b["decode_tok_s"], 3)
        out[f"prefill_long_{tag}"] = round(
            b["prefill_long_ms"] / a["prefill_long_ms"], 3
        )  # >1: we are faster
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--table", type=Path, help="write the markdown table here")
    p.add_argument("--png", type=Path, help="write the chart here")
    args = p.parse_args()
    configure_logging("warning")  # stdout carries the one JSON line
    rows = run(args.rounds, args.threads)
    if args.table:
        args.table.write_text(compare.markdown_table(rows) + "\n")
    if args.png:
        compare.chart(rows, args.png)
    print(
        json.dumps(
            {"bench": "quant", "rounds": args.rounds, "threads": args.threads, **ratios(rows), "rows": rows}
        )
    )


if __name__ == "__main__":
    main()
