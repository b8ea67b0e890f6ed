"""The teacher-forced health gate on the real pack: it holds across kernels (fp32 compute,
as on a core without dot-product instructions) and still refuses broken packs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.inference import Engine, load_pack
from agent.packs.health import HealthBudget, offline_gate, run_goldens
from agent.packs.verify import UpdateRejected
from bench.golden_drift import _fp32_compute, _scrambled_weights, _shifted_tokenizer

pytestmark = pytest.mark.realpack


def _variant(src: Path, dst: Path, change: Callable[[Path, Path], None]) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        os.link(f, dst / f.name)  # the changed file is replaced, never written through
    change(src, dst)
    return dst


def _engine(pack: Path) -> Engine:
    return Engine(load_pack(pack, hash_files=False, check_ram=False), threads=2)


def test_fp32_compute_passes_the_gate(real_pack_path: Path, tmp_path: Path) -> None:
    pack = _variant(real_pack_path, tmp_path / "fp32", _fp32_compute)
    stats = run_goldens(_engine(pack), HealthBudget(), 0.0)
    assert stats.golden_min_agreement == 1.0


@pytest.mark.parametrize(
    ("change", "says"),
    [(_scrambled_weights, "recorded tokens are among"), (_shifted_tokenizer, "tokenizer does not decode")],
)
def test_broken_packs_fail_the_gate(
    real_pack_path: Path, tmp_path: Path, change: Callable[[Path, Path], None], says: str
) -> None:
    pack = _variant(real_pack_path, tmp_path / "broken", change)
    with pytest.raises(UpdateRejected, match=says) as err:
        run_goldens(_engine(pack), HealthBudget(), 0.0)
    assert err.value.reason_code == "health_gate"


def test_a_truncated_weights_file_fails_to_load(real_pack_path: Path, tmp_path: Path) -> None:
    def truncate(src: Path, dst: Path) -> None:
        (dst / "weights.bin").unlink()
        (dst / "weights.bin").write_bytes((src / "weights.bin").read_bytes()[: 1 << 20])

    pack = _variant(real_pack_path, tmp_path / "short", truncate)
    gate = offline_gate(lambda p, hashed: _engine(p), None, HealthBudget())
    with pytest.raises(UpdateRejected, match="does not load") as err:
        gate(pack, 0)
    assert err.value.reason_code == "health_gate"
