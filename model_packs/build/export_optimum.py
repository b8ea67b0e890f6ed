"""``edge-pack build --exporter optimum``: a pack from a Hugging Face model the fused builder
does not know (GPT-2, OPT, GPT-NeoX, ...), exported by optimum.

optimum writes the float graph (ONNX text generation with past); from there the build is the
fused one's: the same blockwise quantizer (quantize_onnx.py rewrites the export's weights with
quantize.py's codes), the same evaluation against the float graph and the same gate, golden
prompts through the device engine, and the same manifest, with ``graph: optimum``.

optimum's ONNX exporter (the ``optimum-onnx`` package, 0.1.0) pins transformers below 4.58,
which cannot share a virtualenv with the reference tests' transformers 5. So it runs as a
command in its own environment: ``$EDGE_SLM_OPTIMUM_CLI``, else ``optimum-cli`` on the PATH
(``make optimum`` makes ``.venv-optimum``). This module only starts it and reads its output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort
import structlog

from model_packs import levels, runtimes
from model_packs.build.builder import (
    PREPACK_FACTOR,
    RUNTIME_MB,
    TOKENIZER_FACTOR,
    BuildOptions,
    build_key,
    embedding_section,
    existing_pack,
    golden_outputs,
    manifest_tail,
    publish_staged,
    quality_gate,
    write_json,
)
from model_packs.build.evaluate import EvalResult, OptimumGraphRunner, check_gate, evaluate, heldout_text
from model_packs.build.quantize_onnx import (
    MODEL_FILE,
    WEIGHTS_FILE,
    QuantizeOptions,
    QuantizeReport,
    quantize_graph,
)
from model_packs.errors import SourceModelError
from model_packs.fileio import sha256_file
from model_packs.format import GRAPH_OPTIMUM, MANIFEST_NAME, FileEntry, file_entry, parse_manifest
from model_packs.optimum_io import PastLayout
from model_packs.progress import StepProgress

log = structlog.get_logger("edge_slm.build")
OPTIMUM_CLI_ENV = "EDGE_SLM_OPTIMUM_CLI"
TASK = "text-generation-with-past"
EXPORT_TIMEOUT_S = 3600
# a model directory without a chat template is served as plain completion: the messages' text
PLAIN_TEMPLATE = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
BLOCKWISE = ("int8-block32", "int4-block32", "mixed-block32", "mixed-attn8-block32")
# GatherBlockQuantized over 8-bit codes (the embedding): onnxruntime 1.22.0 refuses the graph
# ("invalid model"), 1.23.0 runs it with the same logits as 1.32 (checked on the tiny GPT-2 pack)
ORT_FLOOR = "1.23.0"
PREFILL_ROWS = 256  # the engine's prefill chunk (agent.inference.engine.PREFILL_CHUNK)


@dataclass(frozen=True)
class HfModelDir:
    """What the pack needs from the model directory besides the graph."""

    path: Path
    config: dict[str, Any]
    tokenizer_json: str
    chat_template: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    sha256: str
    add_bos: bool = False  # the tokenizer puts the start token before any text (tokenizer_config)

    def number(self, *keys: str, default: int) -> int:
        """The first of ``keys`` config.json has (families spell the same thing differently)."""
        return next((int(self.config[k]) for k in keys if isinstance(self.config.get(k), int)), default)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceModelError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return (int(value),) if isinstance(value, int) else ()


def read_model_dir(path: Path) -> HfModelDir:
    """config.json, tokenizer.json and the chat template; refuses what the pack cannot serve."""
    if not (path / "config.json").is_file():
        raise SourceModelError(
            f"{path} has no config.json: --exporter optimum needs a Hugging Face model directory"
        )
    if not (path / "tokenizer.json").is_file():
        raise SourceModelError(f"{path} has no tokenizer.json (the device reads fast tokenizers only)")
    config = _json(path / "config.json")
    tok_cfg, gen = _json(path / "tokenizer_config.json"), _json(path / "generation_config.json")
    template_file = path / "chat_template.jinja"
    template = (
        template_file.read_text() if template_file.is_file() else str(tok_cfg.get("chat_template") or "")
    )
    eos = _ids(gen.get("eos_token_id", config.get("eos_token_id")))
    if not eos:
        raise SourceModelError(f"{path}: no eos_token_id in config.json or generation_config.json")
    bos = config.get("bos_token_id")
    return HfModelDir(
        path=path,
        config=config,
        tokenizer_json=(path / "tokenizer.json").read_text(),
        chat_template=template or PLAIN_TEMPLATE,
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=eos,
        sha256=_dir_digest(path),
        add_bos=isinstance(bos, int) and bool(tok_cfg.get("add_bos_token", False)),
    )


def _dir_digest(path: Path) -> str:
    """sha256 over every file's name and content: the source's identity."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def optimum_cli() -> str:
    """The exporter command: ``$EDGE_SLM_OPTIMUM_CLI``, else ``optimum-cli`` on the PATH."""
    configured = os.environ.get(OPTIMUM_CLI_ENV)
    found = configured or shutil.which("optimum-cli")
    if not found or not Path(found).is_file():
        raise SourceModelError(
            f"optimum's exporter is not installed ({OPTIMUM_CLI_ENV}={configured or 'unset'}, "
            "no optimum-cli on the PATH): `make optimum` makes .venv-optimum; then set "
            f"{OPTIMUM_CLI_ENV}=.venv-optimum/bin/optimum-cli"
        )
    return found


# transformers 5 writes the rotary settings into ``rope_parameters``; the exporter's 4.57 reads
# only the old top-level keys and silently takes its defaults (checked: a Llama saved by 5.x
# with base 100000 is read back as 10000). So each setting is also written the 4.x ways.
_ROPE_4X = {
    "rope_theta": ("rope_theta", "rotary_emb_base"),
    "partial_rotary_factor": ("partial_rotary_factor", "rotary_pct"),
}


def exporter_source(src: HfModelDir, scratch: Path) -> Path:
    """The directory the exporter reads: the source, or where its config spells the rotary
    settings only the transformers 5 way, a copy of it in ``scratch`` (links to its files)
    whose config.json says them the 4.x way too. Settings with no 4.x spelling are refused."""
    rope = src.config.get("rope_parameters")
    if not isinstance(rope, dict):
        return src.path
    if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", *_ROPE_4X}:
        raise SourceModelError(
            f"{src.path}: rope_parameters {rope} has no spelling optimum's transformers 4.57 reads "
            "(only the default rotary type with rope_theta and partial_rotary_factor is translated)"
        )
    added = {old: rope[new] for new, olds in _ROPE_4X.items() if new in rope for old in olds}
    added = {k: v for k, v in added.items() if k not in src.config}
    if not added:
        return src.path
    shadow = scratch / src.path.name
    shadow.mkdir(parents=True)
    for f in src.path.iterdir():
        if f.name != "config.json":
            (shadow / f.name).symlink_to(f.resolve())
    (shadow / "config.json").write_text(json.dumps({**src.config, **added}, indent=2))
    log.info("rope_parameters_translated", added=added)
    return shadow


def export_float(source: Path, out_dir: Path) -> Path:
    """Run optimum's ONNX export of ``source`` into ``out_dir``; returns the float graph."""
    cmd = [optimum_cli(), "export", "onnx", "--model", str(source), "--task", TASK, str(out_dir)]
    log.info("optimum_export", source=str(source))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceModelError(f"optimum export of {source} did not run: {exc}") from None
    model = out_dir / MODEL_FILE
    if done.returncode != 0 or not model.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise SourceModelError(f"optimum export of {source} failed (exit {done.returncode}):\n{tail}")
    return model


def optimum_key(opts: BuildOptions, source_sha: str) -> str:
    """The fused build's key for the same inputs, marked as this exporter's (never equal)."""
    return hashlib.sha256(f"{build_key(opts, source_sha)}:exporter=optimum".encode()).hexdigest()


def build_optimum_pack(opts: BuildOptions) -> Path:
    """Export, quantize, evaluate, gate and publish; the same inputs again find the pack."""
    if opts.quantization not in BLOCKWISE:
        raise SourceModelError(
            f"--exporter optimum builds the blockwise levels {BLOCKWISE}, not {opts.quantization!r}"
        )
    if opts.source is None or not opts.source.is_dir():
        raise SourceModelError("--exporter optimum needs --source, a Hugging Face model directory")
    src = read_model_dir(opts.source)
    key = optimum_key(opts, src.sha256)
    found = existing_pack(opts, key)
    if found is not None:
        log.info("pack_up_to_date", pack=str(found))
        return found
    opts.packs_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{opts.name}-staging-", dir=opts.packs_dir))
    try:
        _build_into(staging, src, opts, key)
        publish_staged(staging, opts.pack_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("build_done", pack=str(opts.pack_dir), exporter="optimum")
    return opts.pack_dir


def _build_into(staging: Path, src: HfModelDir, opts: BuildOptions, key: str) -> None:
    with tempfile.TemporaryDirectory(prefix="float-", dir=opts.packs_dir) as float_dir:
        float_model = export_float(exporter_source(src, Path(float_dir) / "source"), Path(float_dir))
        progress = StepProgress(f"quantize {opts.quantization}")
        qopts = QuantizeOptions(levels.widths(opts.quantization), accuracy_level=opts.accuracy_level)
        report = quantize_graph(float_model, staging, qopts)
        progress(1, 1)
        ref = OptimumGraphRunner(float_model, opts.threads)
        quant = OptimumGraphRunner(staging / MODEL_FILE, opts.threads)
        result = _evaluate(src, ref, quant, opts)
    log.info("evaluation", top1=round(result.top1_agreement, 4), ratio=round(result.ppl_ratio, 4))
    check_gate(result, *quality_gate(opts))
    (staging / "tokenizer.json").write_text(src.tokenizer_json, encoding="utf-8")
    (staging / "chat_template.jinja").write_text(src.chat_template, encoding="utf-8")
    manifest = _manifest(src, opts, key, report, quant.layout, result, staging)
    write_json(staging / MANIFEST_NAME, manifest)
    manifest["golden"] = golden_outputs(staging, opts)
    write_json(staging / MANIFEST_NAME, manifest)
    parse_manifest(manifest)


def _floors() -> tuple[str, dict[str, str]]:
    """The builder's onnxruntime floors, none below what GatherBlockQuantized needs."""

    def at_least(requirement: str) -> str:
        return f">={max(runtimes.floor_text(requirement), ORT_FLOOR, key=runtimes.version_tuple)}"

    any_machine, by_machine = runtimes.manifest_floors()
    return at_least(any_machine), {m: at_least(v) for m, v in by_machine.items()}


def memory_need(
    src: HfModelDir, past: PastLayout, report: QuantizeReport, entries: dict[str, FileEntry], context: int
) -> dict[str, int]:
    """``min_ram_mb`` and its parts, as the fused builder states them (builder.memory_need),
    with what an export costs more: the past twice (each pass concatenates it into a new one)
    and a prefill chunk's logits for every row (the export returns them all; the engine copies
    the rows it wants). SmolLM2-135M built this way (bench/flavours.py): 610 MB stated, peak
    RSS over the full 2,048-token context 568 MB."""
    chunk = min(PREFILL_ROWS, context)
    heads = src.number("num_attention_heads", "n_head", "num_heads", default=past.kv_heads)
    inner = src.number("intermediate_size", "n_inner", "ffn_dim", default=4 * report.embedding.cols)
    kv = 2 * 2 * past.layers * past.kv_heads * past.head_dim * 4 * context
    scores = heads * chunk * context * 4
    logits = 2 * chunk * report.embedding.rows * 4
    parts = {
        "runtime_mb": RUNTIME_MB,
        "tokenizer_mb": int(entries["tokenizer.json"].length * TOKENIZER_FACTOR / 2**20) + 1,
        "weights_mb": int(entries[WEIGHTS_FILE].length * PREPACK_FACTOR / 2**20) + 1,
        "kv_cache_mb": int(kv / 2**20) + 1,
        "activations_mb": int((scores + 3 * chunk * inner * 4 + logits) / 2**20) + 1,
    }
    return {**parts, "total_mb": sum(parts.values())}


def max_context(src: HfModelDir) -> int:
    return src.number("max_position_embeddings", "n_positions", "n_ctx", "seq_length", default=2048)


def _evaluate(
    src: HfModelDir, ref: OptimumGraphRunner, quant: OptimumGraphRunner, opts: BuildOptions
) -> EvalResult:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(src.tokenizer_json).encode(heldout_text(), add_special_tokens=False).ids
    bos = src.bos_token_id if src.add_bos else None  # scored as the model reads text (builder)
    chunk = min(opts.eval_chunk, max_context(src) - (bos is not None))  # a start token fits too
    progress = StepProgress("evaluate vs float")
    return evaluate(ref, quant, list(ids[: opts.heldout_tokens]), chunk, progress, bos=bos)


def _manifest(
    src: HfModelDir,
    opts: BuildOptions,
    key: str,
    report: QuantizeReport,
    past: PastLayout,
    result: EvalResult,
    staging: Path,
) -> dict[str, Any]:
    entries = {
        p.name: file_entry(p) for p in sorted(staging.iterdir()) if p.is_file() and p.name != MANIFEST_NAME
    }
    context = min(opts.context_length, max_context(src))
    memory = memory_need(src, past, report, entries, context)
    ort_any, ort_by_machine = _floors()
    emb = report.embedding
    return {
        "format": 1,
        "name": opts.name,
        "version": opts.version,
        "graph": GRAPH_OPTIMUM,
        "base_model": {"name": src.path.name, "origin": src.path.name, "sha256": src.sha256},
        "license": str(src.config.get("license", "unknown")),
        "build_key": key,
        "quantization": {
            "method": opts.quantization,
            "bits": min(report.bits) if report.bits else 8,
            "widths": levels.widths(opts.quantization),
            "block_size": emb.block_size,
            "accuracy_level": opts.accuracy_level,
        },
        "architecture": {
            "hidden_size": emb.cols,
            "num_layers": past.layers,
            "num_heads": src.number("num_attention_heads", "n_head", "num_heads", default=past.kv_heads),
            "num_kv_heads": past.kv_heads,
            "head_dim": past.head_dim,
            "vocab_size": emb.rows,
            "max_context": max_context(src),
        },
        "model_file": MODEL_FILE,
        "embedding": embedding_section(WEIGHTS_FILE, emb),
        **manifest_tail(
            opts,
            bos=src.bos_token_id,
            eos=src.eos_token_ids,
            memory=memory,
            floors=(ort_any, ort_by_machine),
            context=context,
            result=result,
            entries=entries,
        ),
        "extra": {"onnxruntime_at_build": ort.__version__, "exporter": "optimum", **opts.extra},
    }
