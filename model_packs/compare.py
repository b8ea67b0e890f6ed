"""``edge-pack compare PACK...``: quantization levels side by side, measured on this machine.

For each pack: size on disk, resident memory after load and after a long prompt, decode
tokens/s, prefill time of a short and a long prompt, the perplexity and top-1 agreement against
the float model that its build measured (the manifest's evaluation), and golden agreement: the
share of greedy tokens on the golden prompts that match the first pack's (until the first
difference, so one early difference counts fully).

Each measurement runs in a fresh process (``python -m model_packs.compare --measure PACK``) so
the resident memory is that pack's alone; the packs are measured in turn, round after round, so
noise falls on all of them alike, and the table shows each figure's median over the rounds
(with the spread in the JSON). The chart is optional (matplotlib, in the build extra).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from model_packs.errors import PackError

SHORT_PROMPT = (
    "You are the assistant of a greenhouse controller. The air temperature is 27.5 C, "
    "relative humidity 81 percent and soil moisture 22 percent. Explain in a few sentences "
    "whether the vents should be opened and whether the beds need water."
)
LONG_REPEAT = 24  # the short prompt's facts repeated: about 1,500 tokens with the chat template
DECODE_TOKENS = 64
GOLDEN_TOKENS = 24


def status_mb() -> dict[str, float]:
    """This process's resident memory from /proc/self/status, in MB: VmRSS, VmHWM (the peak),
    RssAnon and RssFile (what the kernel can drop)."""
    out: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def pack_size_mb(pack: Path) -> float:
    """Bytes on disk in MB (1e6, as edge-pack inspect says them)."""
    return round(sum(p.stat().st_size for p in pack.iterdir() if p.is_file()) / 1e6, 1)


def long_prompt_text() -> str:
    facts = " ".join(f"Reading {i}: " + SHORT_PROMPT for i in range(LONG_REPEAT))
    return facts + " Summarise the readings in one sentence."


def workload(pack: Path, golden: Sequence[str]) -> dict[str, Any]:
    """The token ids every side is given (the pack's tokenizer and chat template), cut to fit
    the pack's context (a test pack's is short): short and long prompt, golden prompts, and
    how many tokens to decode."""
    from agent.inference.pack import load_pack
    from agent.inference.prompts import ChatTemplate, chat_messages
    from agent.inference.tokenizer import TextTokenizer

    loaded = load_pack(pack, check_ram=False, hash_files=False)
    context = loaded.manifest.generation.context_length
    system = loaded.manifest.generation.system_prompt
    tok, template = TextTokenizer(loaded.tokenizer_json), ChatTemplate(loaded.chat_template)

    def ids(text: str) -> list[int]:
        return tok.encode_parts(template.render_parts(chat_messages(text, system)))

    short = ids(SHORT_PROMPT)[: context // 2]
    return {
        "short": short,
        "long": ids(long_prompt_text())[: context - 8],
        "golden": [ids(p) for p in golden],
        "decode_tokens": min(DECODE_TOKENS, context - len(short)),
        "golden_tokens": min(GOLDEN_TOKENS, context // 4),
    }


def measure(pack: Path, threads: int, work: dict[str, Any]) -> dict[str, Any]:
    """One pack in this process: load, then short and long prompts, decode, golden tokens."""
    from agent.inference import Engine, GenerationRequest, load_pack

    t0 = time.perf_counter()
    engine = Engine(load_pack(pack), threads=threads, prefix_cache=False)
    load_s = time.perf_counter() - t0
    after_load = status_mb()
    short, long_ids = work["short"], work["long"]
    engine.generate(GenerationRequest(short, 4, ignore_eos=True))  # warm-up: kernels, arena
    run = engine.generate(GenerationRequest(short, work["decode_tokens"], ignore_eos=True))
    long_run = engine.generate(GenerationRequest(long_ids, 8, ignore_eos=True))
    tokens = [
        engine.generate(GenerationRequest(g, work["golden_tokens"], ignore_eos=True)).token_ids
        for g in work["golden"]
    ]
    return {
        "load_s": round(load_s, 3),
        "rss_after_load_mb": after_load["VmRSS"],
        "anon_after_load_mb": after_load.get("RssAnon"),
        "peak_rss_mb": status_mb()["VmHWM"],
        "decode_tok_s": round(run.usage.decode_tokens_per_s, 2),
        "prefill_short_ms": round(run.usage.time_to_first_token_s * 1000, 1),
        "short_prompt_tokens": len(short),
        "prefill_long_ms": round(long_run.usage.time_to_first_token_s * 1000, 1),
        "long_prompt_tokens": len(long_ids),
        "golden_tokens": tokens,
    }


def run_side(cmd: list[str], what: str) -> dict[str, Any]:
    """Run one measuring process; its last stdout line is the JSON result."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise PackError(f"measuring {what} failed: {out.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure_in_subprocess(pack: Path, threads: int, work_file: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "model_packs.compare", "--measure", str(pack), "--threads", str(threads)]
    return run_side([*cmd, "--work", str(work_file)], str(pack))


def golden_agreement(tokens: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> float:
    """Share of reference tokens matched before the first difference, over all prompts."""
    matched = total = 0
    for got, want in zip(tokens, reference, strict=True):
        total += len(want)
        for a, b in zip(got, want, strict=False):
            if a != b:
                break
            matched += 1
    return round(matched / total, 3) if total else 0.0


NUMERIC = (
    "rss_after_load_mb",
    "anon_after_load_mb",
    "peak_rss_mb",
    "decode_tok_s",
    "prefill_short_ms",
    "prefill_long_ms",
    "load_s",
)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over the rounds, with its min..max spread."""
    out: dict[str, Any] = {k: runs[0][k] for k in ("short_prompt_tokens", "long_prompt_tokens")}
    for key in NUMERIC:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = round(statistics.median(values), 2)
            out[f"{key}_spread"] = [min(values), max(values)]
    out["golden_tokens"] = runs[0]["golden_tokens"]  # greedy: the same every round
    return out


def pack_row(pack: Path) -> dict[str, Any]:
    """What the manifest says: level, size, evaluation against the float model."""
    from model_packs.format import read_manifest

    m = read_manifest(pack)
    ev = m.evaluation
    return {
        "name": pack.name,
        "kind": "pack",
        "tokenizer": m.files[m.tokenizer.file].sha256[:12],  # golden agreement needs the same vocabulary
        "level": m.quantization.method,
        "size_mb": pack_size_mb(pack),
        "ppl": round(ev.perplexity_quant, 3),
        "ppl_ratio": round(ev.ppl_ratio, 4),
        "top1": round(ev.top1_agreement, 4),
    }


def run_rounds(
    sides: dict[str, Callable[[], dict[str, Any]]], rounds: int, progress: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Each side once per round, the order rotated each round; their summaries by name."""
    names = list(sides)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            progress(f"round {r + 1}/{rounds}: {name}")
            runs[name].append(sides[name]())
    return {n: summarise(v) for n, v in runs.items()}


def progress(line: str) -> None:
    print(f"[compare] {line}", file=sys.stderr, flush=True)


def measure_packs(
    packs: Mapping[str, Path], rounds: int, threads: int, workdir: Path
) -> dict[str, dict[str, Any]]:
    """Rows by name: each pack gets the same texts as token ids of its own tokenizer and chat
    template (written into ``workdir``), the golden prompts being the first pack's; the rows
    keep their golden tokens (see :func:`with_golden_agreement`)."""
    golden = golden_prompts(next(iter(packs.values())))
    sides: dict[str, Callable[[], dict[str, Any]]] = {}
    for i, (name, pack) in enumerate(packs.items()):
        work = workdir / f"work-{i}.json"
        work.write_text(json.dumps(workload(pack, golden)))
        sides[name] = functools.partial(measure_in_subprocess, pack, threads, work)
    measured = run_rounds(sides, rounds, progress)
    return {name: {**pack_row(pack), **measured[name]} for name, pack in packs.items()}


def compare(packs: Sequence[Path], rounds: int, threads: int, workdir: Path) -> list[dict[str, Any]]:
    """Rows for ``packs`` in order, golden agreement against the first."""
    rows = measure_packs({str(p): p for p in packs}, rounds, threads, workdir)
    return with_golden_agreement(list(rows.values()))


def with_golden_agreement(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Golden agreement against the first row, for rows with the first row's tokenizer (token
    ids of another vocabulary cannot be compared: None); the token lists leave the rows."""
    reference, vocab = rows[0]["golden_tokens"], rows[0].get("tokenizer")
    out = []
    for row in rows:
        tokens = row.pop("golden_tokens")
        same = row.get("tokenizer") == vocab
        out.append({**row, "golden_agreement": golden_agreement(tokens, reference) if same else None})
    return out


COLUMNS = (
    ("name", "pack / model", "{}"),
    ("size_mb", "size MB", "{:.1f}"),
    ("rss_after_load_mb", "RSS load MB", "{:.0f}"),
    ("peak_rss_mb", "RSS long MB", "{:.0f}"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"),
    ("prefill_short_ms", "prefill short ms", "{:.0f}"),
    ("prefill_long_ms", "prefill long ms", "{:.0f}"),
    ("ppl", "perplexity", "{:.2f}"),
    ("top1", "top-1 vs float", "{:.3f}"),
    ("golden_agreement", "golden agree", "{:.2f}"),
)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"
    lines = [head, rule]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Four panels (size, RSS after load, decode tok/s, perplexity), one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("size_mb", "size on disk (MB)"),
        ("rss_after_load_mb", "RSS after load (MB)"),
        ("decode_tok_s", "decode tokens/s"),
        ("ppl", "held-out perplexity"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 0.5 * len(rows) + 2))
    names = [r["name"] for r in rows]
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [float(r[key]) if r.get(key) is not None else 0.0 for r in rows]
        ax.barh(names, values, color=["#2a7" if r.get("kind") == "pack" else "#888" for r in rows])
        ax.set_title(title)
        ax.invert_yaxis()
        if ax is not axes[0]:
            ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def golden_prompts(pack: Path) -> tuple[str, ...]:
    """The golden prompts the pack was built with (the first pack's serve for all)."""
    from model_packs.format import read_manifest

    return tuple(g.prompt for g in read_manifest(pack).golden)


def main_measure(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m model_packs.compare")
    p.add_argument("--measure", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, required=True, help="JSON from workload()")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.measure, args.threads, json.loads(args.work.read_text()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_measure(sys.argv[1:]))
