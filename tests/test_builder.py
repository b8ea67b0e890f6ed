"""Pack builder on the tiny model: graph correctness, manifest, idempotency, the gate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from model_packs.build.builder import build_pack
from model_packs.build.evaluate import EvalResult, GraphRunner, check_gate
from model_packs.build.graph import GraphOptions, write_graph
from model_packs.build.load import load_source
from model_packs.build.quantize import dequantize_blockwise, quantize_blockwise
from model_packs.build.source import unpermute_rotary
from model_packs.errors import PackExistsError, QualityGateError, SourceModelError
from model_packs.format import read_manifest, verify_pack
from tests.conftest import tiny_build_options
from tests.reference_llama import forward


def test_float_graph_matches_numpy_reference(tiny_source: Path, tmp_path: Path) -> None:
    src = load_source(tiny_source)
    write_graph(src, tmp_path, GraphOptions(quantized=False))
    runner = GraphRunner(tmp_path / "model.onnx", src.config, lambda t: src.weights["embed"][t], threads=1)
    ids = [5, 17, 42, 99, 3, 250, 7, 7, 61, 120, 11, 300]
    got = runner.logits(ids)
    want = forward(src.weights, src.config, ids)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_blockwise_quantization_roundtrip_error_is_small() -> None:
    w = np.random.default_rng(1).standard_normal((64, 80)).astype(np.float32)
    q = quantize_blockwise(w, 32)
    assert q.codes.shape == (64, 3, 32) and q.codes.dtype == np.uint8
    back = dequantize_blockwise(q, 80)
    # worst case is half a step per block: max|block| / 127 / 2
    step = np.abs(w).max() / 127
    assert np.abs(back - w).max() <= step / 2 + 1e-6


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    heads, hd, cols = 3, 8, 5
    w = np.arange(heads * hd * cols, dtype=np.float32).reshape(heads * hd, cols)
    # llama.cpp's convert script: reshape(heads, 2, hd/2, ...).swapaxes(1, 2)
    permuted = w.reshape(heads, 2, hd // 2, cols).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rotary(permuted, heads), w)


def test_tiny_pack_has_manifest_evaluation_and_golden(tiny_pack_path: Path) -> None:
    m = verify_pack(tiny_pack_path)
    assert m.quantization.method == "int8-block32" and m.quantization.block_size == 32
    assert {"model.onnx", "weights.bin", "embed.bin", "tokenizer.json", "chat_template.jinja"} <= set(m.files)
    assert m.evaluation.passed and m.evaluation.heldout_tokens > 100
    assert len(m.golden) == 2 and all(len(g.token_ids) > 0 for g in m.golden)
    graph = (tiny_pack_path / "model.onnx").read_bytes()
    assert b"MatMulNBits" in graph and b"GroupQueryAttention" in graph


def test_rebuild_of_same_inputs_does_nothing(tiny_source: Path, tiny_pack_path: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny_pack_path.iterdir()}
    again = build_pack(tiny_build_options(tiny_source, tiny_pack_path.parent))
    assert again == tiny_pack_path
    assert {p.name: p.stat().st_mtime_ns for p in tiny_pack_path.iterdir()} == before


def test_same_version_from_other_inputs_is_refused(tiny_source: Path, tiny_pack_path: Path) -> None:
    with pytest.raises(PackExistsError, match="bump --version"):
        build_pack(tiny_build_options(tiny_source, tiny_pack_path.parent, context_length=64))


def test_damaged_pack_is_rebuilt(tiny_source: Path, tmp_path: Path) -> None:
    path = build_pack(tiny_build_options(tiny_source, tmp_path))
    with (path / "weights.bin").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff\xfe")
    rebuilt = build_pack(tiny_build_options(tiny_source, tmp_path))
    verify_pack(rebuilt)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_gate_refusal_writes_nothing(tiny_source: Path, tmp_path: Path) -> None:
    opts = tiny_build_options(
        tiny_source, tmp_path, quantization="int8-dynamic-per-tensor", min_top1=0.999, max_ppl_ratio=1.0001
    )
    with pytest.raises(QualityGateError, match="quality gate refused"):
        build_pack(opts)
    assert not opts.pack_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_check_gate_names_each_failed_threshold() -> None:
    check_gate(EvalResult(100, 0.95, 20.0, 20.5))
    with pytest.raises(QualityGateError, match=r"top-1 agreement 0.585 < 0.93.*perplexity 42.80"):
        check_gate(EvalResult(100, 0.585, 22.9, 42.8))


def test_bad_sources_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceModelError, match="does not exist"):
        load_source(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(SourceModelError, match="not a readable GGUF"):
        load_source(junk)
    (tmp_path / "hf").mkdir()
    with pytest.raises(SourceModelError, match=r"no config\.json"):
        load_source(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(SourceModelError, match="not supported"):
        load_source(tmp_path / "hf")


def test_manifest_records_sizes_and_runtime(tiny_pack_path: Path) -> None:
    m = read_manifest(tiny_pack_path)
    for rel, entry in m.files.items():
        assert os.path.getsize(tiny_pack_path / rel) == entry.length
    assert m.runtime.min_ram_mb > 0 and m.runtime.onnxruntime.startswith(">=")
