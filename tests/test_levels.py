"""Quantization levels: int8, int4, mixed (4-bit layers, 8-bit head and embedding) and
mixed-attn8 (4-bit MLP, 8-bit attention)
built from the same tiny model, each through its gate; the graph carries the widths the level
names, and the manifest says so."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from model_packs import levels
from model_packs.build.builder import build_pack
from model_packs.format import read_manifest
from tests.conftest import tiny_build_options


def test_short_names_resolve_and_unknown_levels_name_the_accepted_ones() -> None:
    assert [levels.resolve(n) for n in ("int8", "int4", "mixed")] == [
        "int8-block32",
        "int4-block32",
        "mixed-block32",
    ]
    assert levels.resolve("int4-block32") == "int4-block32"
    with pytest.raises(ValueError, match="not one of: int8, int4, mixed"):
        levels.resolve("int3")


def _widths_in_graph(pack: Path) -> dict[str, int]:
    """Bits of each MatMulNBits node by the matrix it multiplies (qkv, o, gate, up, down, head)."""
    model = onnx.load(str(pack / "model.onnx"), load_external_data=False)
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        bits = next(a.i for a in node.attribute if a.name == "bits")
        kind = "lm_head" if node.output[0].startswith("logits") else node.output[0].split(".")[2]
        kind = kind.removesuffix("_codes").removesuffix("_out")
        kind = {"mlp": "down"}.get(kind, kind)  # the down projection writes the MLP's output
        if out.setdefault(kind, bits) != bits:
            raise AssertionError(f"{kind} has two widths")
    return out


@pytest.fixture(scope="module")
def level_packs(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    packs = tmp_path_factory.mktemp("level-packs")
    # gates loose enough for a random model; the real levels' gates are the builder's own
    return {
        name: build_pack(
            tiny_build_options(
                tiny_source, packs, quantization=levels.resolve(name), min_top1=0.0, max_ppl_ratio=100.0
            )
        )
        for name in ("int8", "int4", "mixed", "mixed-attn8-block32")
    }


def test_each_level_has_the_widths_it_names_in_graph_and_manifest(level_packs: dict[str, Path]) -> None:
    expected = {
        "int8": {"qkv": 8, "o": 8, "gate": 8, "up": 8, "down": 8, "lm_head": 8},
        "int4": {"qkv": 4, "o": 4, "gate": 4, "up": 4, "down": 4, "lm_head": 4},
        "mixed": {"qkv": 4, "o": 4, "gate": 4, "up": 4, "down": 4, "lm_head": 8},
        "mixed-attn8-block32": {"qkv": 8, "o": 8, "gate": 4, "up": 4, "down": 4, "lm_head": 8},
    }
    for name, pack in level_packs.items():
        assert _widths_in_graph(pack) == expected[name], name
        q = read_manifest(pack).quantization
        assert q.method == levels.resolve(name)
        assert q.bits == min(expected[name].values())


def test_mixed_sits_between_int8_and_int4_in_size(level_packs: dict[str, Path]) -> None:
    size = {name: (pack / "weights.bin").stat().st_size for name, pack in level_packs.items()}
    # the tiny model's LM head is its own matrix (untied): 4 bits in int4, 8 in the others
    assert size["int4"] < size["mixed"] < size["mixed-attn8-block32"] < size["int8"]
    raw = read_manifest(level_packs["mixed"])
    assert raw.evaluation.passed and raw.evaluation.top1_agreement > 0
