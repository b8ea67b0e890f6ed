"""The two model families side by side: SmolLM2-135M (default pack) and Gemma 3 270M.

Prints one JSON line. Each pack is measured in its own process (``model_packs.compare``'s
measurement: RSS after load, decode tokens/s, prefill of a short and a ~1,500-token prompt),
the two in turn, the order swapped each round; figures are medians with their min..max
spread. Each pack gets the same texts through its own tokenizer and template.

Held-out perplexity is per token of each model's own tokenizer, so the two are not
comparable as they are (Gemma's 262k vocabulary cuts the text into fewer, harder tokens);
``heldout_bits_per_byte`` puts both on the text's bytes: ln(perplexity) x scored tokens /
ln 2 / bytes those tokens cover (the build's evaluation: 4 chunks of 256, 255 scored each).

    python bench/families.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from agent.logs import configure_logging
from model_packs import compare
from model_packs.build.builder import BuildOptions, build_pack
from model_packs.build.evaluate import heldout_text
from model_packs.build.source_gemma import gemma_gguf_path
from model_packs.format import default_pack_path, packs_dir, read_manifest


def gemma_pack() -> Path:
    """The Gemma 3 270M int8 pack in the cache (built on first use, as the tests build it)."""
    return build_pack(
        BuildOptions(name="gemma3-270m", version="1.0.0", packs_dir=packs_dir(), source=gemma_gguf_path())
    )


def bits_per_byte(pack: Path) -> float:
    """The build's held-out perplexity on the text's bytes (see the module docstring)."""
    from tokenizers import Tokenizer

    m = read_manifest(pack)
    tok = Tokenizer.from_str((pack / m.tokenizer.file).read_text())
    ids = tok.encode(heldout_text(), add_special_tokens=False).ids[: m.evaluation.heldout_tokens]
    covered = len(tok.decode(ids).encode("utf-8"))
    chunks = math.ceil(len(ids) / 256)
    scored = len(ids) - chunks
    nll_nats = math.log(m.evaluation.perplexity_quant) * scored
    return round(nll_nats / math.log(2) / (covered * scored / len(ids)), 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    configure_logging("warning")
    packs = {"smollm2-135m": default_pack_path(), "gemma3-270m": gemma_pack()}
    with tempfile.TemporaryDirectory() as tmp:
        measured = compare.measure_packs(packs, args.rounds, args.threads, Path(tmp))
    out: dict[str, Any] = {"bench": "families", "rounds": args.rounds, "threads": args.threads}
    for name, pack in packs.items():
        row = {**measured[name], "heldout_bits_per_byte": bits_per_byte(pack)}
        row.pop("golden_tokens", None)
        out[name] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
