"""Orchestrate a pack build: source -> float + int8 graphs -> evaluation -> gate -> pack.

Acting is kept in this module; the pieces it calls decide nothing about the file system.
The pack is assembled in a staging directory beside its final place and renamed into
place only after it passed the quality gate, so a cache never holds a half-built or
refused pack. Building the same inputs again finds the pack and does nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort
import structlog

from model_packs import levels, runtimes
from model_packs.build.evaluate import (
    MAX_PPL_RATIO,
    MIN_TOP1,
    EvalResult,
    GraphRunner,
    check_gate,
    evaluate,
    heldout_text,
)
from model_packs.build.graph import (
    EMBED_FILE,
    MODEL_FILE,
    WEIGHTS_FILE,
    EmbedLayout,
    GraphOptions,
    write_graph,
)
from model_packs.build.load import load_source
from model_packs.build.source import SourceModel, default_gguf_path
from model_packs.errors import PackError, PackExistsError, SourceModelError
from model_packs.fileio import atomic_write_bytes, fsync_dir, sha256_file
from model_packs.format import (
    MANIFEST_NAME,
    Embedding,
    file_entry,
    parse_manifest,
    read_manifest,
    verify_pack,
)
from model_packs.progress import StepProgress

log = structlog.get_logger("edge_slm.build")
# 6: min_ram_mb counts the tokenizer and the load's peak; 5: the start token before each
# evaluation chunk where the model expects one (Gemma 3); 4: min_ram_mb from its measured parts
# (runtime.memory); 3: per-machine onnxruntime floors
BUILDER_VERSION = "7"
# (min top-1 agreement, max perplexity ratio) against the float model, by level. int4 measured
# on SmolLM2-135M: top-1 0.83, perplexity x1.097 (the layers are exact against the Q4_1 source;
# the loss is the 4-bit LM head's, whose source is Q8_0); int8: 0.967, x1.009; mixed (4-bit MLP,
# exact against the source's Q4_1 blocks, 8-bit head): gate as int8's, measured in the note.
QUALITY_GATES = {"int4-block32": (0.80, 1.12)}
DEFAULT_GOLDEN = (
    "What is the capital of France?",
    "Name three vegetables that grow well in a greenhouse.",
    "What temperature does water boil at, in Celsius?",
)
BUILDER_ID = f"edge-slm-agent builder {BUILDER_VERSION}"


@dataclass(frozen=True)
class BuildOptions:
    name: str
    version: str
    packs_dir: Path
    source: Path | None = None
    quantization: str = levels.DEFAULT_LEVEL
    # MatMulNBits compute: 4 = int8 activations (needs dot-product on arm64 to be fast), 1 = fp32
    accuracy_level: int = 4
    context_length: int = 2048
    max_tokens: int = 256
    threads: int = 2
    golden_prompts: tuple[str, ...] = DEFAULT_GOLDEN
    golden_tokens: int = 24
    golden_min_match: float = 0.75
    heldout_tokens: int = 1024
    eval_chunk: int = 256
    force: bool = False
    min_top1: float | None = None  # the quality gate; None: the level's own (QUALITY_GATES)
    max_ppl_ratio: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pack_dir(self) -> Path:
        """``NAME-VERSION``; another level than the default is a variant: ``NAME-VERSION-LEVEL``."""
        level = "" if self.quantization == "int8-block32" else f"-{self.quantization}"
        acc = "" if self.accuracy_level == 4 else f"-acc{self.accuracy_level}"
        return self.packs_dir / f"{self.name}-{self.version}{level}{acc}"


def quality_gate(opts: BuildOptions) -> tuple[float, float]:
    """The thresholds this build must pass: the options' own, else its level's."""
    min_top1, max_ppl = QUALITY_GATES.get(opts.quantization, (MIN_TOP1, MAX_PPL_RATIO))
    return (
        min_top1 if opts.min_top1 is None else opts.min_top1,
        max_ppl if opts.max_ppl_ratio is None else opts.max_ppl_ratio,
    )


def build_key(opts: BuildOptions, source_sha: str) -> str:
    """The inputs that define a pack; same key (and same builder), same pack."""
    material = {
        "source": source_sha,
        "name": opts.name,
        "version": opts.version,
        "quantization": opts.quantization,
        "context": opts.context_length,
        "golden": opts.golden_prompts,
        "golden_tokens": opts.golden_tokens,
        "heldout": hashlib.sha256(heldout_text().encode()).hexdigest(),
        "heldout_tokens": opts.heldout_tokens,
        "max_tokens": opts.max_tokens,
        "gate": list(quality_gate(opts)),
    }
    if opts.accuracy_level != 4:  # named only when not the default, so default packs keep their key
        material["accuracy_level"] = opts.accuracy_level
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def existing_pack(opts: BuildOptions, key: str) -> Path | None:
    """The finished pack for these inputs, if the cache already holds it intact."""
    target = opts.pack_dir
    if opts.force or not (target / MANIFEST_NAME).exists():
        return None
    try:
        manifest = verify_pack(target)
    except PackError as exc:
        log.warning("pack_damaged_rebuilding", pack=str(target), reason=exc.message)
        return None
    if manifest.build_key == key and manifest.builder == BUILDER_ID:
        return target
    if manifest.build_key == key:
        log.info("builder_changed_rebuilding", pack=str(target), was=manifest.builder)
        return None
    raise PackExistsError(f"{target} exists but was built from other inputs; bump --version or pass --force")


def build_pack(opts: BuildOptions) -> Path:
    if opts.quantization not in levels.LEVELS:
        raise SourceModelError(f"quantization {opts.quantization!r} is not one of {levels.LEVELS}")
    source_path = opts.source or default_gguf_path()
    src_key = _source_key(source_path)
    key = build_key(opts, src_key)
    found = existing_pack(opts, key)
    if found is not None:
        log.info("pack_up_to_date", pack=str(found))
        return found
    log.info("build_start", source=str(source_path), pack=str(opts.pack_dir), quantization=opts.quantization)
    src = load_source(source_path, StepProgress("read weights"))
    opts.packs_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{opts.name}-staging-", dir=opts.packs_dir))
    try:
        _build_into(staging, src, opts, key)
        publish_staged(staging, opts.pack_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("build_done", pack=str(opts.pack_dir))
    return opts.pack_dir


def _source_key(path: Path) -> str:
    """Identity of the source for the idempotency check: a file's sha256, or for a
    directory its path and the size and mtime of every file in it."""
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise SourceModelError(f"base model {path} does not exist")
    stats = [
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    ]
    return hashlib.sha256(json.dumps([str(path.resolve()), stats]).encode()).hexdigest()


def _build_into(staging: Path, src: SourceModel, opts: BuildOptions, key: str) -> None:
    with tempfile.TemporaryDirectory(prefix="float-", dir=opts.packs_dir) as float_dir:
        ref_dir = Path(float_dir)
        write_graph(src, ref_dir, GraphOptions(quantized=False), StepProgress("float reference graph"))
        layout = _write_quantized(src, staging, ref_dir, opts)
        result = _evaluate(src, ref_dir, staging, layout, opts)
    log.info(
        "evaluation",
        top1=round(result.top1_agreement, 4),
        ppl_float=round(result.perplexity_float, 3),
        ppl_quant=round(result.perplexity_quant, 3),
        ratio=round(result.ppl_ratio, 4),
    )
    check_gate(result, *quality_gate(opts))
    (staging / "tokenizer.json").write_text(src.tokenizer_json, encoding="utf-8")
    (staging / "chat_template.jinja").write_text(src.chat_template, encoding="utf-8")
    manifest = _manifest(src, opts, key, layout, result, staging, golden=[])
    write_json(staging / MANIFEST_NAME, manifest)
    manifest["golden"] = golden_outputs(staging, opts)
    write_json(staging / MANIFEST_NAME, manifest)
    parse_manifest(manifest)


def _write_quantized(src: SourceModel, staging: Path, ref_dir: Path, opts: BuildOptions) -> EmbedLayout:
    if not opts.quantization.startswith("int8-dynamic"):  # the blockwise levels
        widths = levels.widths(opts.quantization)
        graph = GraphOptions(
            quantized=True,
            bits=widths["attention"],
            mlp_bits=widths["mlp"],
            head_bits=widths["lm_head"],
            accuracy_level=opts.accuracy_level,
        )
        return write_graph(src, staging, graph, StepProgress(f"quantize {opts.quantization}"))
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    layout = write_graph(src, staging, GraphOptions(quantized=False), StepProgress("float graph"))
    progress = StepProgress(f"quantize {opts.quantization}")
    progress(0, 1)
    quantize_dynamic(
        ref_dir / MODEL_FILE,
        staging / "model.q.onnx",
        weight_type=QuantType.QInt8,
        per_channel=opts.quantization.endswith("per-channel"),
        use_external_data_format=True,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    for leftover in (MODEL_FILE, "weights.bin"):
        (staging / leftover).unlink()
    (staging / "model.q.onnx").rename(staging / MODEL_FILE)
    progress(1, 1)
    return layout


def _evaluate(
    src: SourceModel, ref_dir: Path, staging: Path, layout: EmbedLayout, opts: BuildOptions
) -> EvalResult:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(src.tokenizer_json).encode(heldout_text(), add_special_tokens=False).ids
    ids = list(ids[: opts.heldout_tokens])
    float_embed = src.weights["embed"]
    from agent.inference.pack import EmbeddingTable

    table = EmbeddingTable.open(staging, Embedding(EMBED_FILE, **dataclasses.asdict(layout)))
    quant_embed = table.rows
    ref = GraphRunner(ref_dir / MODEL_FILE, src.config, lambda t: float_embed[t], opts.threads)
    quant = GraphRunner(staging / MODEL_FILE, src.config, quant_embed, opts.threads)
    bos = src.bos_token_id if src.add_bos else None
    return evaluate(ref, quant, ids, opts.eval_chunk, StepProgress("evaluate vs float"), bos=bos)


def golden_outputs(staging: Path, opts: BuildOptions) -> list[dict[str, Any]]:
    """Greedy outputs of the quantized pack through the device engine itself."""
    from agent.inference.engine import Engine, GenerationRequest
    from agent.inference.pack import load_pack

    engine = Engine(load_pack(staging, check_ram=False), threads=opts.threads)
    progress = StepProgress("golden prompts")
    out = []
    for i, prompt in enumerate(opts.golden_prompts):
        done = engine.generate(GenerationRequest(engine.prompt_ids(prompt), opts.golden_tokens))
        out.append(
            {
                "prompt": prompt,
                "token_ids": done.token_ids,
                "text": done.text,
                "min_match": opts.golden_min_match,
            }
        )
        progress(i + 1, len(opts.golden_prompts))
    return out


def _manifest(
    src: SourceModel,
    opts: BuildOptions,
    key: str,
    layout: EmbedLayout,
    result: EvalResult,
    staging: Path,
    golden: list[dict[str, Any]],
) -> dict[str, Any]:
    cfg = src.config
    entries = {
        p.name: file_entry(p) for p in sorted(staging.iterdir()) if p.is_file() and p.name != MANIFEST_NAME
    }
    ort_any, ort_by_machine = runtimes.manifest_floors()
    memory = memory_need(cfg, opts, entries)
    return {
        "format": 1,
        "name": opts.name,
        "version": opts.version,
        "base_model": {"name": src.name, "origin": os.path.basename(src.origin), "sha256": src.sha256},
        "license": src.license,
        "build_key": key,
        "quantization": {
            "method": opts.quantization,
            "bits": levels.narrowest(opts.quantization),
            "widths": levels.widths(opts.quantization),
            "block_size": layout.block_size,
            "accuracy_level": opts.accuracy_level,
        },
        "architecture": {
            "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size,
            "max_context": cfg.max_context,
        },
        "model_file": MODEL_FILE,
        "embedding": embedding_section(EMBED_FILE, layout),
        **manifest_tail(
            opts,
            bos=src.bos_token_id,
            eos=src.eos_token_ids,
            memory=memory,
            floors=(ort_any, ort_by_machine),
            context=opts.context_length,
            result=result,
            entries=entries,
        ),
        "golden": golden,
    }


def embedding_section(file: str, layout: EmbedLayout) -> dict[str, Any]:
    """The manifest's ``embedding``: where the int8 table lies (the engine maps it from there)."""
    return {"file": file, **dataclasses.asdict(layout)}


def manifest_tail(
    opts: BuildOptions,
    *,
    bos: int | None,
    eos: tuple[int, ...],
    memory: dict[str, int],
    floors: tuple[str, dict[str, str]],
    context: int,
    result: EvalResult,
    entries: dict[str, Any],
) -> dict[str, Any]:
    """The manifest sections every builder writes alike (the fused one here, the optimum
    exporter): tokenizer, runtime needs, generation defaults, the evaluation against its gate,
    the files, who built it and when. ``golden`` is added once the pack can run."""
    min_top1, max_ratio = quality_gate(opts)
    return {
        "tokenizer": {
            "file": "tokenizer.json",
            "chat_template_file": "chat_template.jinja",
            "bos_token_id": bos,
            "eos_token_ids": list(eos),
        },
        "runtime": {
            "min_ram_mb": memory["total_mb"],
            "memory": memory,
            "onnxruntime": floors[0],
            "onnxruntime_by_machine": floors[1],
            "execution_providers": ["CPUExecutionProvider"],
        },
        "generation": {
            "max_tokens": opts.max_tokens,
            "temperature": 0.0,
            "top_k": 0,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
            "context_length": context,
            "system_prompt": "",
        },
        "evaluation": {
            "heldout_tokens": result.tokens,
            "top1_agreement": result.top1_agreement,
            "perplexity_float": result.perplexity_float,
            "perplexity_quant": result.perplexity_quant,
            "ppl_ratio": result.ppl_ratio,
            "min_top1": min_top1,
            "max_ppl_ratio": max_ratio,
            "passed": True,
        },
        "golden": [],
        "files": {name: {"sha256": e.sha256, "length": e.length} for name, e in entries.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "builder": BUILDER_ID,
        "extra": {"onnxruntime_at_build": ort.__version__, **opts.extra},
    }


# What a serving process holds beside the pack's weights, tokenizer, KV cache and prefill
# activations, measured on x86_64 with the default pack: python, numpy, onnxruntime and the
# agent's imports, the arena and the logits (peak 413 MB at a full 2,048-token context, of which
# 169 weights, 91 KV, 23 activations, 17 tokenizer: 113 left); with a margin.
RUNTIME_MB = 125
# onnxruntime's pre-packed MatMulNBits weights against the bytes in the pack (block sums and
# scales in its own layout): 170 MB for 148 MB of weights and shared head, measured.
PREPACK_FACTOR = 1.15
# Loading pre-packs the LM head from the embedding table with a transient copy: the load peak
# stood 19 MB above the settled RSS for SmolLM2 (30 MB table), 107 MB for Gemma 3 (190 MB).
LOAD_TRANSIENT_FACTOR = 1.0  # 0.75 measured; a fresh clone peaked a few MB higher
# A loaded `tokenizers` instance against its tokenizer.json, after the engine hands freed heap
# back: 17 MB for SmolLM2's 1.5 MB, 100 MB for Gemma 3's 13.6 MB (measured).
TOKENIZER_FACTOR = 11.5


def memory_need(cfg: Any, opts: BuildOptions, entries: dict[str, Any]) -> dict[str, int]:
    """The RAM a process serving the pack needs (``min_ram_mb``): the larger of its peak while
    loading and at full context. Parts: the runtime, the tokenizer, the pre-packed weights (the
    layers, and the embedding table when the 8-bit LM head computes from it), then either the
    load's transient copy or the KV cache at ``context_length`` (float32 keys and values) and
    one prefill chunk's activations (attention scores against the whole context, the MLP)."""
    from agent.inference.engine import PREFILL_CHUNK

    head_reads_table = cfg.tie_embeddings and levels.widths(opts.quantization)["lm_head"] == 8
    files = (WEIGHTS_FILE, EMBED_FILE) if head_reads_table else (WEIGHTS_FILE,)
    weights = sum(e.length for name, e in entries.items() if name in files)
    tokenizer = entries["tokenizer.json"].length if "tokenizer.json" in entries else 0
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * opts.context_length
    chunk = min(PREFILL_CHUNK, opts.context_length)
    scores = cfg.num_heads * chunk * opts.context_length * 4
    mlp = 3 * chunk * cfg.intermediate_size * 4
    table = entries[EMBED_FILE].length if EMBED_FILE in entries else 0
    parts = {
        "runtime_mb": RUNTIME_MB,
        "tokenizer_mb": int(tokenizer * TOKENIZER_FACTOR / 2**20) + 1,
        "weights_mb": int(weights * PREPACK_FACTOR / 2**20) + 1,
        "load_transient_mb": int(table * LOAD_TRANSIENT_FACTOR / 2**20) + 1,
        "kv_cache_mb": int(kv / 2**20) + 1,
        "activations_mb": int((scores + mlp) / 2**20) + 1,
    }
    settled = parts["runtime_mb"] + parts["tokenizer_mb"] + parts["weights_mb"]
    full_context = settled + parts["kv_cache_mb"] + parts["activations_mb"]
    return {**parts, "total_mb": max(full_context, settled + parts["load_transient_mb"])}


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2).encode("utf-8"))


def publish_staged(staging: Path, target: Path) -> None:
    """Swap the finished pack into place; an older pack at that path goes only after."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    read_manifest(target)
