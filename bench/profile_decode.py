"""Where a decode step's time goes: onnxruntime's own profile of the engine's session, by
operator type, and the time outside ``run`` (Python: embedding lookup, binding, sampling,
detokenizing), for a pack (default: the default pack).

Prints one JSON line: per decoded token, the wall time, the session's run time, and the share
of each operator type (MatMulNBits is the weights; GroupQueryAttention the KV cache; the rest
norms, activations and the final Gather). Profiling itself costs a little time per node, so
the wall figures run slower than bench/engine.py's; the shares are what matter.

    python -m bench.profile_decode [--pack DIR] [--tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import onnxruntime as ort

from agent.inference import Engine, GenerationRequest, load_pack
from agent.logs import configure_logging
from model_packs.compare import SHORT_PROMPT
from model_packs.format import default_pack_path


def profile(pack: Path, tokens: int, threads: int) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="profile-")

    class Profiled(Engine):
        def _open_session(self) -> ort.InferenceSession:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(tmp) / "decode")
            return ort.InferenceSession(str(self.pack.model_path), opts, providers=["CPUExecutionProvider"])

    engine = Profiled(load_pack(pack), threads=threads, prefix_cache=False)
    prompt = engine.prompt_ids(SHORT_PROMPT)
    engine.generate(GenerationRequest(prompt, 8, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    done = engine.generate(GenerationRequest(prompt, tokens, ignore_eos=True))
    wall = time.perf_counter() - t0 - done.usage.time_to_first_token_s
    trace = json.loads(Path(engine._session.end_profiling()).read_text())
    return summarise(trace, tokens, wall, len(prompt))


def _slowest(item: tuple[str, float]) -> float:
    return -item[1]


def summarise(trace: list[dict[str, Any]], tokens: int, wall_s: float, prompt_tokens: int) -> dict[str, Any]:
    """Per decode step: node time by operator type and session run time (the runs with one
    input token; the prefills are left out)."""
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes = [e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    # the last ``tokens - 1`` runs are the measured generation's decode steps
    decode_runs = runs[-(tokens - 1) :]
    start = decode_runs[0]["ts"]
    by_op: dict[str, float] = defaultdict(float)
    for e in nodes:
        if e["ts"] >= start:
            by_op[e.get("args", {}).get("op_name", "?")] += e["dur"]
    node_us = sum(by_op.values())
    run_us = sum(e["dur"] for e in decode_runs)
    steps = len(decode_runs)
    per_token_ms = wall_s * 1000 / steps
    return {
        "bench": "profile_decode",
        "prompt_tokens": prompt_tokens,
        "decode_steps": steps,
        "wall_ms_per_token": round(per_token_ms, 3),
        "session_run_ms_per_token": round(run_us / 1000 / steps, 3),
        "outside_run_share": round(1 - run_us / 1000 / steps / per_token_ms, 3),
        "node_share_by_op": {
            k: round(v / node_us, 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])
        },
        "node_ms_per_token_by_op": {k: round(v / 1000 / steps, 3) for k, v in by_op.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pack", type=Path, default=None)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    configure_logging("warning")
    print(json.dumps(profile(args.pack or default_pack_path(), args.tokens, args.threads)))


if __name__ == "__main__":
    main()
