"""Runs inside the arm64 root (under qemu with an instruction-counting plugin): load a pack,
prefill one prompt and decode exactly ``max_tokens`` greedy tokens on one thread.

Two runs that differ only in ``max_tokens`` differ only in decode steps, so the difference of
their instruction counts divided by the difference of tokens is the cost of one decode step
(engine, onnxruntime and the Python loop around them). One thread keeps the count exact.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.inference import Engine, GenerationRequest, load_pack
from model_packs.format import default_pack_path

PROMPT = "Name three vegetables that grow well in a greenhouse."


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("max_tokens", type=int)
    p.add_argument("--pack", type=Path, default=None)
    args = p.parse_args()
    pack = load_pack(args.pack or default_pack_path(), check_ram=False, hash_files=False)
    engine = Engine(pack, threads=1)
    request = GenerationRequest(engine.prompt_ids(PROMPT), args.max_tokens, ignore_eos=True)
    done = engine.generate(request)
    print(json.dumps({"tokens": len(done.token_ids), "finish": done.finish_reason}), flush=True)


if __name__ == "__main__":
    main()
