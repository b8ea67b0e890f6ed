"""`edge-pack build --exporter optimum` on a family the fused builder does not know: GPT-2.

A tiny randomly initialised GPT-2 is built here with transformers and saved with a tokenizer;
optimum's exporter (its own environment: `make test` makes .venv-optimum and points
EDGE_SLM_OPTIMUM_CLI at it) writes the float graph; the pack is quantized, gated, published,
loaded by the device Engine, and its greedy text is held against transformers' own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from agent.inference import Engine, GenerationRequest
from agent.inference.hf_graph import OptimumGraph
from agent.inference.pack import LoadedPack, load_pack
from model_packs import runtimes
from model_packs.build.builder import BuildOptions
from model_packs.build.export_optimum import (
    OPTIMUM_CLI_ENV,
    build_optimum_pack,
    export_float,
    exporter_source,
    optimum_cli,
    read_model_dir,
)
from model_packs.build.quantize import dequantize_blockwise, quantize_blockwise
from model_packs.build.quantize_onnx import QuantizeOptions, quantize_graph
from model_packs.cli import main as edge_pack
from model_packs.errors import ManifestError, QualityGateError, SourceModelError
from model_packs.format import GRAPH_FUSED, GRAPH_OPTIMUM, parse_manifest, read_manifest, verify_pack
from tests.tiny_model import CHATML, train_tokenizer

pytestmark = pytest.mark.optimum
torch = pytest.importorskip("torch", reason="the tiny GPT-2 is built with torch (the reference extra)")
transformers = pytest.importorskip("transformers", reason="the tiny GPT-2 is built with transformers")
PROMPTS = ("The greenhouse temperature is", "Soil moisture reads")


def _exporter_or_skip() -> None:
    """`make test` installs the exporter and sets the variable; a bare pytest without either
    skips, naming the make target. With the variable set, a broken exporter fails."""
    if os.environ.get(OPTIMUM_CLI_ENV) is None and shutil.which("optimum-cli") is None:
        pytest.skip(f"optimum's exporter is not installed: `make optimum`, then set {OPTIMUM_CLI_ENV}")


def write_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    """2 layers, 64 wide, 4 heads, 128 positions, the tiny tokenizer; weights scaled so the
    next-token choices are decisive (a flat random model flips argmaxes at any rounding)."""
    tok = train_tokenizer()
    eos = tok.token_to_id("<|im_end|>")
    cfg = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(50.0 if "wte" in name else 10.0)
    model.save_pretrained(path)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", chat_template=CHATML
    )
    fast.save_pretrained(path)
    return path


def write_tiny(family: str, path: Path, rope: dict[str, float | str] | None = None) -> Path:
    """A tiny OPT (Linear layers exported as MatMul and Gemm with bias, tied head) or GPT-NeoX
    (fused query_key_value, rotary, an untied head), decisive as the GPT-2 is."""
    tok = train_tokenizer()
    eos, vocab = tok.token_to_id("<|im_end|>"), tok.get_vocab_size()
    shape = {"vocab_size": vocab, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    ids = {"max_position_embeddings": 128, "bos_token_id": eos, "eos_token_id": eos}
    if family == "opt":
        cfg = transformers.OPTConfig(**shape, **ids, ffn_dim=128, word_embed_proj_dim=64, pad_token_id=0)
        model = transformers.OPTForCausalLM(cfg)
    else:
        extra = {"rope_parameters": rope} if rope else {}
        cfg = transformers.GPTNeoXConfig(
            **shape, **ids, intermediate_size=128, tie_word_embeddings=False, **extra
        )
        model = transformers.GPTNeoXForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(50.0 if "embed" in name else 10.0)
    model.eval().save_pretrained(path)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", chat_template=CHATML
    )
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")


@pytest.fixture(scope="module")
def float_dir(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _exporter_or_skip()
    out = tmp_path_factory.mktemp("float")
    export_float(gpt2_dir, out)
    return out


@pytest.fixture(scope="module")
def pack_path(gpt2_dir: Path, float_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built through the CLI, as a user would: `edge-pack build --exporter optimum`."""
    packs = tmp_path_factory.mktemp("packs")
    args = ["build", "--exporter", "optimum", "--source", str(gpt2_dir), "--out", str(packs)]
    assert edge_pack([*args, "--name", "tiny-gpt2", "--version", "1.0.0", "--threads", "1"]) == 0
    return packs / "tiny-gpt2-1.0.0"


@pytest.fixture(scope="module")
def pack(pack_path: Path) -> LoadedPack:
    return load_pack(pack_path, check_ram=False)


def _hf_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, recomputed from the full sequence every step."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def graph_dims(graph: onnx.GraphProto, name: str) -> list[int]:
    return next(list(t.dims) for t in graph.initializer if t.name == name)


def _greedy(engine: Engine, prompt: list[int], n: int) -> list[int]:
    return engine.generate(GenerationRequest(prompt, n, ignore_eos=True)).token_ids


def _prompt(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.encode_parts([(text, True)])


def test_pack_is_gated_and_says_its_graph(pack_path: Path) -> None:
    m = verify_pack(pack_path)
    assert m.graph == GRAPH_OPTIMUM
    assert m.base_model["name"] == "tiny-gpt2" and m.extra["exporter"] == "optimum"
    assert m.evaluation.passed and m.evaluation.top1_agreement >= 0.93
    assert (
        m.architecture.num_layers == 2 and m.architecture.num_kv_heads == 4 and m.architecture.head_dim == 16
    )
    assert m.generation.context_length == 128  # clamped to the model's positions
    assert len(m.golden) == 3 and all(g.token_ids for g in m.golden)
    assert sorted(m.files) == ["chat_template.jinja", "model.onnx", "tokenizer.json", "weights.bin"]
    memory = json.loads((pack_path / "manifest.json").read_text())["runtime"]["memory"]
    assert memory.pop("total_mb") == m.runtime.min_ram_mb == sum(memory.values())
    assert set(memory) == {"runtime_mb", "tokenizer_mb", "weights_mb", "kv_cache_mb", "activations_mb"}
    # GatherBlockQuantized over 8-bit codes: onnxruntime 1.22 refuses the graph
    floors = [m.runtime.onnxruntime, *m.runtime.onnxruntime_by_machine.values()]
    assert all(runtimes.version_tuple(f) >= (1, 23, 0) for f in floors)


def test_weights_are_blockwise_and_the_embedding_is_stored_once(pack: LoadedPack, gpt2_dir: Path) -> None:
    graph = onnx.load(str(pack.model_path), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 9  # 4 per layer and the tied LM head
    assert ops.count("GatherBlockQuantized") == 1 and "Gemm" not in ops
    matmul_weights = {i for n in graph.node if n.op_type == "MatMul" for i in n.input} & {
        t.name for t in graph.initializer
    }
    assert not matmul_weights  # no float matrix left by a constant
    wte = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).transformer.wte.weight.detach().numpy()
    want = dequantize_blockwise(quantize_blockwise(wte, 32), wte.shape[1])
    ids = [0, 5, wte.shape[0] - 1]
    np.testing.assert_array_equal(pack.embedding.rows(ids), want[ids])  # the manifest's table
    # the Gather's [vocab, hidden] codes and the tied head's [vocab, blocks, 32] are one region
    offsets = {
        tuple(t.dims): int({e.key: e.value for e in t.external_data}["offset"])
        for t in graph.initializer
        if t.data_type == onnx.TensorProto.UINT8 and t.dims[0] == wte.shape[0]
    }
    vocab, hidden = wte.shape
    at = pack.manifest.embedding.codes_offset
    assert offsets == {(vocab, hidden): at, (vocab, hidden // 32, 32): at}
    floats = [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert not [n for n in floats if sorted(graph_dims(graph, n)) == sorted([vocab, hidden])]  # no float copy


def test_float_export_greedy_equals_transformers(pack: LoadedPack, float_dir: Path, gpt2_dir: Path) -> None:
    engine = Engine(dataclasses.replace(pack, path=float_dir), threads=1)  # the export, unquantized
    for text in PROMPTS:
        prompt = _prompt(engine, text)
        assert _greedy(engine, prompt, 24) == _hf_greedy(gpt2_dir, prompt, 24)


def test_quantized_pack_greedy_stays_close_to_transformers(pack: LoadedPack, gpt2_dir: Path) -> None:
    engine = Engine(pack, threads=1)
    for text in PROMPTS:
        prompt = _prompt(engine, text)
        got, want = _greedy(engine, prompt, 24), _hf_greedy(gpt2_dir, prompt, 24)
        assert got[:4] == want[:4]
        assert sum(a == b for a, b in zip(got, want, strict=True)) >= 0.75 * len(want)


def test_incremental_decoding_equals_full_recomputation(pack: LoadedPack) -> None:
    graph = OptimumGraph(pack.model_path, 1, ["CPUExecutionProvider"])
    ids = [int(t) for t in np.random.default_rng(1).integers(0, pack.manifest.architecture.vocab_size, 40)]
    full = graph.forward(ids, 0, np.arange(len(ids)))
    graph.forward(ids[:25], 0)
    steps = [graph.forward([t], 25 + i)[0] for i, t in enumerate(ids[25:])]
    np.testing.assert_allclose(np.stack(steps), full[25:], atol=1e-3 * np.abs(full).max(), rtol=0)
    assert graph.rows == len(ids)
    again = graph.forward(ids[10:12], 10, np.arange(2))  # back to row 10: later rows are dropped
    np.testing.assert_allclose(again, full[10:12], atol=1e-3 * np.abs(full).max(), rtol=0)
    assert graph.rows == 12


def test_engine_prefix_reuse_matches_a_fresh_prompt(pack: LoadedPack) -> None:
    reused, fresh = Engine(pack, threads=1), Engine(pack, threads=1, prefix_cache=False)
    _greedy(reused, _prompt(reused, "The greenhouse temperature is 21 degrees and"), 8)
    prompt = _prompt(reused, "The greenhouse temperature is 30 percent and")
    done = reused.generate(GenerationRequest(prompt, 12, ignore_eos=True))
    assert done.usage.cached_prompt_tokens > 0
    assert done.token_ids == _greedy(fresh, prompt, 12)


def test_int4_level_uses_4bit_kernels(float_dir: Path, tmp_path: Path) -> None:
    report = quantize_graph(
        float_dir / "model.onnx", tmp_path, QuantizeOptions({"attention": 4, "mlp": 4, "lm_head": 8})
    )
    assert report.bits == {4: 8, 8: 1}
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    bits = sorted(
        a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"
    )
    assert bits == [4] * 8 + [8]
    session = OptimumGraph(tmp_path / "model.onnx", 1, ["CPUExecutionProvider"])
    reference = OptimumGraph(float_dir / "model.onnx", 1, ["CPUExecutionProvider"])
    ids = list(range(3, 43))
    got, want = session.forward(ids, 0, np.arange(40)), reference.forward(ids, 0, np.arange(40))
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.6  # 4 bits on a random model: close, not equal


def test_the_gate_refuses_and_publishes_nothing(gpt2_dir: Path, float_dir: Path, tmp_path: Path) -> None:
    opts = BuildOptions(name="strict", version="1.0.0", packs_dir=tmp_path, source=gpt2_dir, min_top1=0.9999)
    with pytest.raises(QualityGateError):
        build_optimum_pack(opts)
    assert not (tmp_path / "strict-1.0.0").exists() and not list(tmp_path.glob(".strict-staging-*"))


def test_a_start_token_is_scored_within_the_positions(gpt2_dir: Path, tmp_path: Path) -> None:
    """A tokenizer that puts BOS first: each held-out chunk gets it, and still fits the 128
    positions (a 128-token chunk plus BOS would index past GPT-2's position table)."""
    _exporter_or_skip()
    source = tmp_path / "gpt2-bos"
    shutil.copytree(gpt2_dir, source)
    tok_cfg = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "add_bos_token": True}))
    assert read_model_dir(source).add_bos
    opts = BuildOptions(
        name="bos", version="1.0.0", packs_dir=tmp_path / "packs", source=source, eval_chunk=512
    )
    assert verify_pack(build_optimum_pack(opts)).evaluation.passed


def test_same_inputs_find_the_pack(pack_path: Path, gpt2_dir: Path) -> None:
    before = (pack_path / "manifest.json").read_bytes()
    opts = BuildOptions(name="tiny-gpt2", version="1.0.0", packs_dir=pack_path.parent, source=gpt2_dir)
    assert build_optimum_pack(opts) == pack_path
    assert (pack_path / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("family", ["opt", "gpt-neox"])
def test_other_families_build_gate_and_serve(family: str, tmp_path: Path) -> None:
    _exporter_or_skip()
    source = write_tiny(family, tmp_path / f"tiny-{family}")
    opts = BuildOptions(name=f"tiny-{family}", version="1.0.0", packs_dir=tmp_path / "packs", source=source)
    pack = load_pack(build_optimum_pack(opts), check_ram=False)
    assert pack.manifest.graph == GRAPH_OPTIMUM and pack.manifest.evaluation.passed
    graph = onnx.load(str(pack.model_path), load_external_data=False).graph
    assert [n.op_type for n in graph.node].count("MatMulNBits") == 2 * (6 if family == "opt" else 4) + 1
    engine, fresh = Engine(pack, threads=1), Engine(pack, threads=1, prefix_cache=False)
    prompt = _prompt(engine, PROMPTS[0])
    got, want = _greedy(engine, prompt, 16), _hf_greedy(source, prompt, 16)
    assert got[:4] == want[:4] and sum(a == b for a, b in zip(got, want, strict=True)) >= 12
    again = _prompt(engine, PROMPTS[0] + " 30")  # reuses the rows of the first prompt
    assert _greedy(engine, again, 8) == _greedy(fresh, again, 8)


def test_rotary_settings_saved_by_transformers_5_reach_the_export(tmp_path: Path) -> None:
    """transformers 5 writes them as rope_parameters only, which the exporter's 4.57 ignores."""
    _exporter_or_skip()
    rope: dict[str, float | str] = {
        "rope_theta": 500000.0,
        "partial_rotary_factor": 0.5,
        "rope_type": "default",
    }
    source = write_tiny("gpt-neox", tmp_path / "neox", rope)
    assert "rope_theta" not in json.loads((source / "config.json").read_text())
    seen = exporter_source(read_model_dir(source), tmp_path / "scratch")
    float_model = export_float(seen, tmp_path / "float")
    ids = list(range(3, 63))
    with torch.no_grad():
        model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = OptimumGraph(float_model, 1, ["CPUExecutionProvider"]).forward(ids, 0, np.arange(len(ids)))
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max(), rtol=0)


def test_rotary_settings_without_an_old_spelling_are_refused(tmp_path: Path) -> None:
    rope: dict[str, float | str] = {"rope_theta": 500000.0, "rope_type": "linear", "factor": 8.0}
    src = read_model_dir(write_tiny("gpt-neox", tmp_path / "neox", rope))
    with pytest.raises(SourceModelError, match="rope_parameters"):
        exporter_source(src, tmp_path / "scratch")


# ---------------------------------------------------------------- without the exporter


def test_missing_exporter_is_a_stable_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(OPTIMUM_CLI_ENV, str(tmp_path / "no-such-optimum-cli"))
    with pytest.raises(SourceModelError, match="make optimum") as err:
        optimum_cli()
    assert err.value.code == "bad_source"


def test_manifest_graph_field_is_optional_and_checked(tiny_pack_path: Path) -> None:
    raw = json.loads((tiny_pack_path / "manifest.json").read_text())
    assert "graph" not in raw and read_manifest(tiny_pack_path).graph == GRAPH_FUSED
    assert parse_manifest({**raw, "graph": GRAPH_OPTIMUM}).graph == GRAPH_OPTIMUM
    with pytest.raises(ManifestError, match="graph must be one of"):
        parse_manifest({**raw, "graph": "tflite"})
