"""Gemma 3 graphs against transformers' Gemma3ForCausalLM on the same weights.

The tiny model (four layers, window 6) checks every Gemma feature on a sequence past its
window; the real 270M checks the GGUF reading (norm factors, head size, rotary bases,
the layer pattern that llama.cpp leaves implicit) on its own weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_packs.build.evaluate import GraphRunner, heldout_text
from model_packs.build.graph import GraphOptions, write_graph
from model_packs.build.load import load_source
from model_packs.build.source_gemma import gemma_gguf_path
from tests.reference_gemma import WINDOW, write_gemma_dir
from tests.test_gemma import TOKENIZER_TEXT

pytestmark = [pytest.mark.reference]
torch = pytest.importorskip("torch", reason="the reference check needs the reference extra (torch)")
transformers = pytest.importorskip("transformers", reason="the reference check needs transformers")


def _float_logits(path: Path, out: Path, ids: list[int]) -> np.ndarray:
    src = load_source(path)
    out.mkdir(exist_ok=True)
    write_graph(src, out, GraphOptions(quantized=False))
    runner = GraphRunner(out / "model.onnx", src.config, lambda t: src.weights["embed"][t], threads=2)
    return runner.logits(ids)


def test_tiny_gemma_float_graph_matches_transformers(tmp_path: Path) -> None:
    hf_dir = write_gemma_dir(tmp_path / "hf")
    ids = [5, 17, 42, 99, 3, 250, 7, 7, 61, 120, 11, 300, 12, 13, 14, 200, 201, 9, 8, 77]
    assert len(ids) > 3 * WINDOW
    model = transformers.Gemma3ForCausalLM.from_pretrained(
        str(hf_dir), torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = _float_logits(hf_dir, tmp_path / "graph", ids)
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


def _rows_logits(runner: GraphRunner, ids: list[int], rows: list[int]) -> np.ndarray:
    """The graph's logits at ``rows`` only (the LM head runs for those), empty cache."""
    cfg, n = runner.cfg, len(ids)
    empty = np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), dtype=np.float32)
    feeds = {
        "inputs_embeds": runner.embed(ids)[None],
        "logits_index": np.asarray(rows, dtype=np.int64),
        "seqlens_k": np.array([n - 1], dtype=np.int32),
        "total_sequence_length": np.array(n, dtype=np.int32),
    }
    for i in range(cfg.num_layers):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
    return np.asarray(runner.session.run(["logits"], feeds)[0][0])


@pytest.fixture(scope="module")
def hf_gemma_tokenizer() -> Any:
    """transformers' own conversion of the GGUF vocabulary (slow: about 40 s)."""
    gguf = gemma_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.mark.realpack
def test_gemma_270m_float_graph_matches_transformers_on_the_gguf(
    tmp_path: Path, hf_gemma_tokenizer: Any
) -> None:
    """600 tokens: past the 512-token window of the local layers. Rows compared: the first
    (no window in play) and the last (the window cuts), not all 600 x 262,144 logits."""
    gguf = gemma_gguf_path()
    ids = [2, *hf_gemma_tokenizer(heldout_text(), add_special_tokens=False)["input_ids"][:599]]
    rows = [*range(16), *range(len(ids) - 16, len(ids))]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0, rows]
        want = model.lm_head(hidden).numpy()
    del model
    src = load_source(gguf)
    write_graph(src, tmp_path, GraphOptions(quantized=False))
    got = _rows_logits(
        GraphRunner(tmp_path / "model.onnx", src.config, lambda t: src.weights["embed"][t]), ids, rows
    )
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max(), rtol=0)


@pytest.mark.realpack
def test_gemma_tokenizer_matches_transformers_gguf_tokenizer(hf_gemma_tokenizer: Any) -> None:
    from gguf import GGUFReader
    from tokenizers import Tokenizer

    from model_packs.build.source_gguf import build_tokenizer_json

    ref = hf_gemma_tokenizer
    ours = Tokenizer.from_str(build_tokenizer_json(GGUFReader(str(gemma_gguf_path()))))
    text = TOKENIZER_TEXT.replace("<start_of_turn>", "").replace("<end_of_turn>", "")
    assert ours.encode(text, add_special_tokens=False).ids == ref(text, add_special_tokens=False)["input_ids"]
