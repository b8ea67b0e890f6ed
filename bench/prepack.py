"""Where the engine's memory goes, by onnxruntime option: resident memory after load and the
decode speed, for each way of holding the pre-packed weights.

Prints one JSON line. Each option runs in its own process (``--option NAME``), in rotated
order over ``--rounds``; figures are medians. Options:

- ``default``: onnxruntime pre-packs the MatMulNBits weights into its own heap (anonymous
  memory), the mapped pack files stay mostly out of RAM;
- ``no_prepack``: ``session.disable_prepacking``: the kernels read the mapped pack directly;
- ``prepacked_file``: the pre-packed weights written once into an optimized model beside the
  pack (``session.save_external_prepacked_constant_initializers``) and mapped from that file
  (file-backed pages: shared between processes and engines of the same pack, and clean, so the
  kernel can drop them under memory pressure; the file doubles the pack's disk use);
- ``no_arena``: the CPU memory arena off.

    python -m bench.prepack [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from model_packs.compare import status_mb

OPTIONS = ("default", "no_prepack", "prepacked_file", "no_arena")


def measure(option: str, threads: int, workdir: Path) -> dict[str, Any]:
    import onnxruntime as ort

    from agent.inference import Engine, GenerationRequest, load_pack
    from model_packs.format import default_pack_path

    pack = load_pack(default_pack_path())
    optimized = workdir / "prepacked" / "model.onnx"

    class Probe(Engine):
        def _open_session(self) -> ort.InferenceSession:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.log_severity_level = 3
            path = self.pack.model_path
            if option == "no_prepack":
                opts.add_session_config_entry("session.disable_prepacking", "1")
            if option == "no_arena":
                opts.enable_cpu_mem_arena = False
            if option == "prepacked_file":
                path = optimized
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    engine = Probe(pack, threads=threads, prefix_cache=False)
    loaded = status_mb()
    prompt = engine.prompt_ids("Explain in a few sentences whether the greenhouse vents should open.")
    engine.generate(GenerationRequest(prompt, 4, ignore_eos=True))
    run = engine.generate(GenerationRequest(prompt, 48, ignore_eos=True))
    return {
        "rss_mb": loaded["VmRSS"],
        "anon_mb": loaded["RssAnon"],
        "file_mb": loaded["RssFile"],
        "decode_tok_s": round(run.usage.decode_tokens_per_s, 2),
    }


def write_prepacked(workdir: Path, threads: int) -> int:
    """The optimized model with its pre-packed weights in a file; its data file's bytes."""
    import onnxruntime as ort

    from model_packs.format import default_pack_path, read_manifest

    pack = default_pack_path()
    out = workdir / "prepacked"
    out.mkdir(parents=True, exist_ok=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out / "model.onnx")
    opts.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(pack / read_manifest(pack).model_file), opts, providers=["CPUExecutionProvider"])
    return (out / "model.data").stat().st_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--option", choices=OPTIONS)
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()
    if args.option:
        print(json.dumps(measure(args.option, args.threads, args.workdir)))
        return
    from model_packs.compare import pack_size_mb
    from model_packs.format import default_pack_path

    with tempfile.TemporaryDirectory(prefix="bench-prepack-") as tmp:
        data_bytes = write_prepacked(Path(tmp), args.threads)
        runs: dict[str, list[dict[str, Any]]] = {o: [] for o in OPTIONS}
        for r in range(args.rounds):
            for option in OPTIONS[r % len(OPTIONS) :] + OPTIONS[: r % len(OPTIONS)]:
                cmd = [
                    sys.executable,
                    "-m",
                    "bench.prepack",
                    "--option",
                    option,
                    "--threads",
                    str(args.threads),
                ]
                out = subprocess.run([*cmd, "--workdir", tmp], capture_output=True, text=True, check=True)
                runs[option].append(json.loads(out.stdout.strip().splitlines()[-1]))
    result: dict[str, Any] = {
        "bench": "prepack",
        "rounds": args.rounds,
        "pack_mb": pack_size_mb(default_pack_path()),
        "prepacked_file_mb": round(data_bytes / 2**20, 1),
    }
    for option, values in runs.items():
        result[option] = {
            k: statistics.median(v[k] for v in values)
            for k in ("rss_mb", "anon_mb", "file_mb", "decode_tok_s")
        }
        result[option]["rss_over_pack"] = round(result[option]["rss_mb"] / result["pack_mb"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
