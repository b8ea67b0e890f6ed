"""The pack format: manifest schema, parsing and file verification.

Defined once and imported by the device (loading a pack), the builder (writing one)
and the fleet (publishing one). Parsing is pure: it turns a JSON mapping into frozen
dataclasses or raises :class:`ManifestError` naming the offending field. File checks
read the files but decide nothing beyond "which file differs".
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model_packs.errors import ManifestError, PackFileError
from model_packs.fileio import sha256_file
from model_packs.layout import is_pack_name
from model_packs.versions import VersionError, parse_version

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# The graph a pack carries. "fused": the builder's own graph (inputs_embeds from the int8 table,
# GroupQueryAttention over a preallocated KV buffer). "optimum": a Hugging Face model exported by
# optimum (input_ids, attention_mask, position_ids, past_key_values.* in; logits, present.* out;
# the past grows by concatenation). A manifest without the field is fused: every pack built
# before the field existed stays valid, byte for byte.
GRAPH_FUSED = "fused"
GRAPH_OPTIMUM = "optimum"
GRAPHS = (GRAPH_FUSED, GRAPH_OPTIMUM)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    length: int


@dataclass(frozen=True)
class Architecture:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int


@dataclass(frozen=True)
class Embedding:
    """Where the engine finds the int8 token-embedding rows (shared with the LM head)."""

    file: str
    rows: int
    cols: int
    block_size: int
    codes_offset: int
    scales_offset: int
    zero_point: int


@dataclass(frozen=True)
class Quantization:
    method: str
    bits: int
    block_size: int
    accuracy_level: int


@dataclass(frozen=True)
class TokenizerInfo:
    file: str
    chat_template_file: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Runtime:
    min_ram_mb: int
    onnxruntime: str  # the floor for any machine (and for agents that read nothing else)
    execution_providers: tuple[str, ...]
    # machine ("x86_64", "aarch64") -> its own floor where it differs (model_packs.runtimes)
    onnxruntime_by_machine: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Generation:
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    context_length: int
    system_prompt: str


@dataclass(frozen=True)
class Golden:
    """A prompt and the greedy token ids the quantized pack produced at build time."""

    prompt: str
    token_ids: tuple[int, ...]
    text: str
    min_match: float


@dataclass(frozen=True)
class Evaluation:
    heldout_tokens: int
    top1_agreement: float
    perplexity_float: float
    perplexity_quant: float
    min_top1: float
    max_ppl_ratio: float

    @property
    def ppl_ratio(self) -> float:
        return self.perplexity_quant / self.perplexity_float

    @property
    def passed(self) -> bool:
        return self.top1_agreement >= self.min_top1 and self.ppl_ratio <= self.max_ppl_ratio


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    base_model: Mapping[str, str]
    license: str
    build_key: str
    quantization: Quantization
    architecture: Architecture
    model_file: str
    embedding: Embedding
    tokenizer: TokenizerInfo
    runtime: Runtime
    generation: Generation
    evaluation: Evaluation
    golden: tuple[Golden, ...]
    files: Mapping[str, FileEntry]
    created: str
    builder: str
    format: int = FORMAT_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)
    graph: str = GRAPH_FUSED  # the graph flavour (GRAPHS); optional in the JSON

    @property
    def variant(self) -> str:
        """The pack's variant name: its quantization level, and the compute where it is not
        the default int8 (``int8-block32``, ``int4-block32``, ``int4-block32-acc1``)."""
        q = self.quantization
        return q.method if q.accuracy_level == 4 else f"{q.method}-acc{q.accuracy_level}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["evaluation"]["ppl_ratio"] = self.evaluation.ppl_ratio
        data["evaluation"]["passed"] = self.evaluation.passed
        return data


# ---------------------------------------------------------------- parsing helpers


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: str) -> Any:
    if key not in obj:
        raise ManifestError(f"manifest field {path}{key} is missing")
    value = obj[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ManifestError(f"manifest field {path}{key} has the wrong type (bool)")
    if not isinstance(value, kind):
        raise ManifestError(
            f"manifest field {path}{key} must be {_kind_name(kind)}, got {type(value).__name__}"
        )
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _section(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    return _get(obj, key, dict, "")  # type: ignore[no-any-return]


def _ints(obj: Mapping[str, Any], names: list[str], path: str) -> dict[str, int]:
    return {n: _get(obj, n, int, path) for n in names}


def _number(obj: Mapping[str, Any], key: str, path: str) -> float:
    return float(_get(obj, key, (int, float), path))


def _parse_files(raw: Mapping[str, Any]) -> dict[str, FileEntry]:
    files: dict[str, FileEntry] = {}
    for rel, entry in raw.items():
        if not isinstance(entry, dict):
            raise ManifestError(f"manifest field files.{rel} must be an object")
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise ManifestError(f"manifest file path {rel!r} escapes the pack directory")
        sha = _get(entry, "sha256", str, f"files.{rel}.")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ManifestError(f"manifest field files.{rel}.sha256 is not a sha256 hex digest")
        files[rel] = FileEntry(sha256=sha, length=_get(entry, "length", int, f"files.{rel}."))
    return files


def _parse_golden(raw: list[Any]) -> tuple[Golden, ...]:
    out = []
    for i, g in enumerate(raw):
        p = f"golden[{i}]."
        if not isinstance(g, dict):
            raise ManifestError(f"manifest field golden[{i}] must be an object")
        ids = _get(g, "token_ids", list, p)
        if not all(isinstance(t, int) for t in ids):
            raise ManifestError(f"manifest field {p}token_ids must hold integers")
        out.append(
            Golden(_get(g, "prompt", str, p), tuple(ids), _get(g, "text", str, p), _number(g, "min_match", p))
        )
    return tuple(out)


def _floors_by_machine(runtime: Mapping[str, Any]) -> dict[str, str]:
    """Optional (packs of builder 2 and earlier have none): machine -> ``>=VERSION``."""
    raw = runtime.get("onnxruntime_by_machine", {})
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and re.fullmatch(r">=\s*\d+(\.\d+){0,2}", v)
        for k, v in raw.items()
    ):
        raise ManifestError(
            "manifest field runtime.onnxruntime_by_machine must map machine names to '>=VERSION'"
        )
    return dict(raw)


def _graph(data: Mapping[str, Any]) -> str:
    """Optional (absent: the fused graph every earlier pack carries); one of GRAPHS."""
    graph = data.get("graph", GRAPH_FUSED)
    if graph not in GRAPHS:
        raise ManifestError(f"manifest field graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    return str(graph)


def _check_version(version: str) -> None:
    try:
        parse_version(version)
    except VersionError as exc:
        raise ManifestError(f"manifest {exc}") from None


def parse_manifest(data: Any) -> Manifest:
    """Validate a decoded manifest and build the typed view; raises ManifestError."""
    if not isinstance(data, dict):
        raise ManifestError("manifest must be a JSON object")
    fmt = _get(data, "format", int, "")
    if fmt != FORMAT_VERSION:
        raise ManifestError(f"manifest format {fmt} is not supported (this agent reads {FORMAT_VERSION})")
    name, version = _get(data, "name", str, ""), _get(data, "version", str, "")
    if not is_pack_name(name):
        raise ManifestError(f"manifest name {name!r} must be lowercase letters, digits, '.', '_' or '-'")
    _check_version(version)
    q, a, e = _section(data, "quantization"), _section(data, "architecture"), _section(data, "embedding")
    t, r, g, ev = (_section(data, k) for k in ("tokenizer", "runtime", "generation", "evaluation"))
    eos = _get(t, "eos_token_ids", list, "tokenizer.")
    bos = t.get("bos_token_id")
    return Manifest(
        name=name,
        version=version,
        base_model={str(k): str(v) for k, v in _section(data, "base_model").items()},
        license=_get(data, "license", str, ""),
        build_key=_get(data, "build_key", str, ""),
        quantization=Quantization(
            method=_get(q, "method", str, "quantization."),
            **_ints(q, ["bits", "block_size", "accuracy_level"], "quantization."),
        ),
        architecture=Architecture(**_ints(a, list(Architecture.__dataclass_fields__), "architecture.")),
        model_file=_get(data, "model_file", str, ""),
        embedding=Embedding(
            file=_get(e, "file", str, "embedding."),
            **_ints(e, [f for f in Embedding.__dataclass_fields__ if f != "file"], "embedding."),
        ),
        tokenizer=TokenizerInfo(
            file=_get(t, "file", str, "tokenizer."),
            chat_template_file=_get(t, "chat_template_file", str, "tokenizer."),
            bos_token_id=bos if isinstance(bos, int) else None,
            eos_token_ids=tuple(int(x) for x in eos),
        ),
        runtime=Runtime(
            min_ram_mb=_get(r, "min_ram_mb", int, "runtime."),
            onnxruntime=_get(r, "onnxruntime", str, "runtime."),
            execution_providers=tuple(_get(r, "execution_providers", list, "runtime.")),
            onnxruntime_by_machine=_floors_by_machine(r),
        ),
        generation=Generation(
            max_tokens=_get(g, "max_tokens", int, "generation."),
            temperature=_number(g, "temperature", "generation."),
            top_k=_get(g, "top_k", int, "generation."),
            top_p=_number(g, "top_p", "generation."),
            repetition_penalty=_number(g, "repetition_penalty", "generation."),
            context_length=_get(g, "context_length", int, "generation."),
            system_prompt=_get(g, "system_prompt", str, "generation."),
        ),
        evaluation=Evaluation(
            heldout_tokens=_get(ev, "heldout_tokens", int, "evaluation."),
            **{
                k: _number(ev, k, "evaluation.")
                for k in (
                    "top1_agreement",
                    "perplexity_float",
                    "perplexity_quant",
                    "min_top1",
                    "max_ppl_ratio",
                )
            },
        ),
        golden=_parse_golden(_get(data, "golden", list, "")),
        files=_parse_files(_section(data, "files")),
        created=_get(data, "created", str, ""),
        builder=_get(data, "builder", str, ""),
        extra=dict(data.get("extra", {})),
        graph=_graph(data),
    )


def read_manifest(pack_dir: Path) -> Manifest:
    """Read and parse ``manifest.json`` from a pack directory."""
    path = pack_dir / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path} not found: {pack_dir} is not a model pack") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    return parse_manifest(data)


# ---------------------------------------------------------------- file checks


def file_entry(path: Path) -> FileEntry:
    """Length and sha256 of a file (hashed in chunks: memory stays flat whatever its size)."""
    return FileEntry(sha256=sha256_file(path), length=path.stat().st_size)


def find_mismatches(pack_dir: Path, manifest: Manifest) -> list[str]:
    """Return one readable line per file that is missing or differs (empty: all good)."""
    problems = []
    for rel, want in sorted(manifest.files.items()):
        path = pack_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != want.length:
            problems.append(f"{rel}: length {size} != manifest {want.length}")
            continue
        got = file_entry(path)
        if got.sha256 != want.sha256:
            problems.append(f"{rel}: sha256 {got.sha256[:16]}... != manifest {want.sha256[:16]}...")
    return problems


def verify_pack(pack_dir: Path) -> Manifest:
    """Parse the manifest and check every file; raise naming each file that differs."""
    manifest = read_manifest(pack_dir)
    t = manifest.tokenizer
    for needed in (manifest.model_file, manifest.embedding.file, t.file, t.chat_template_file):
        if needed not in manifest.files:  # listed, so hashed and confined to the pack
            raise ManifestError(f"manifest does not list {needed!r} in files")
    unlisted = sorted({p.name for p in pack_dir.iterdir()} - set(manifest.files) - {MANIFEST_NAME})
    if unlisted:
        raise ManifestError(f"pack {pack_dir} holds files its manifest does not list: {unlisted[:5]}")
    problems = find_mismatches(pack_dir, manifest)
    if problems:
        raise PackFileError(f"pack {pack_dir} does not match its manifest: " + "; ".join(problems))
    return manifest


def cache_root() -> Path:
    """Root of the local cache (packs, float references); ``$EDGE_SLM_CACHE`` overrides."""
    env = os.environ.get("EDGE_SLM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edge-slm"


def packs_dir() -> Path:
    return cache_root() / "packs"


DEFAULT_PACK_NAME = "smollm2-135m-instruct"
DEFAULT_PACK_VERSION = "1.0.0"


def default_pack_path() -> Path:
    return packs_dir() / f"{DEFAULT_PACK_NAME}-{DEFAULT_PACK_VERSION}"
