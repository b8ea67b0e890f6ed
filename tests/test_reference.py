"""The builder against an independent implementation: transformers reading the same GGUF.

Checks the two things a GGUF conversion gets wrong silently: the q/k row order for
rotary embeddings and the tokenizer rebuilt from the GGUF vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_packs.build.evaluate import GraphRunner, heldout_text
from model_packs.build.graph import GraphOptions, write_graph
from model_packs.build.load import load_source
from model_packs.build.source import SourceModel, default_gguf_path

pytestmark = [pytest.mark.reference, pytest.mark.realpack]
torch = pytest.importorskip("torch", reason="needs the reference extra (torch): make test installs it")
transformers = pytest.importorskip("transformers", reason="the reference check needs transformers")


@pytest.fixture(scope="module")
def source() -> SourceModel:
    return load_source(default_gguf_path())


def test_tokenizer_matches_transformers(source: SourceModel) -> None:
    from tokenizers import Tokenizer

    gguf = default_gguf_path()
    ref = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ours = Tokenizer.from_str(source.tokenizer_json)
    # transformers' GGUF converter drops the "smollm" digit split that llama.cpp and the
    # model's own tokenizer.json apply first; the two differ only on whitespace run into a
    # digit ("a  1"), which this text avoids
    text = heldout_text().rstrip() + " Reading 12345 <|im_start|>user\nCafé 温度 🌡️ it's 21.5°C<|im_end|>"
    assert ours.encode(text, add_special_tokens=False).ids == ref(text, add_special_tokens=False)["input_ids"]


def test_float_graph_matches_transformers_logits(source: SourceModel, tmp_path: Path) -> None:
    gguf = default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
    )
    model.eval()
    ids = source_ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575]
    with torch.no_grad():
        want = model(torch.tensor([source_ids])).logits[0].numpy()
    write_graph(source, tmp_path, GraphOptions(quantized=False))
    runner = GraphRunner(tmp_path / "model.onnx", source.config, lambda t: source.weights["embed"][t])
    got = runner.logits(ids)
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max(), rtol=0)
