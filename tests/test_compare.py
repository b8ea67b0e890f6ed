"""``edge-pack compare``: the tiny model at two levels, measured in real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model_packs import levels
from model_packs.build.builder import build_pack
from model_packs.compare import golden_agreement, markdown_table
from tests.conftest import tiny_build_options


def test_golden_agreement_counts_tokens_until_the_first_difference() -> None:
    ref = [[1, 2, 3, 4], [5, 6]]
    assert golden_agreement(ref, ref) == 1.0
    assert golden_agreement([[1, 2, 9, 4], [5, 6]], ref) == round(4 / 6, 3)  # the 4 after 9 is not counted
    assert golden_agreement([[9, 2, 3, 4], [9, 6]], ref) == 0.0


def test_the_table_shows_a_dash_for_a_figure_a_row_lacks() -> None:
    table = markdown_table([{"name": "a", "size_mb": 1.25, "ppl": None}])
    assert table.splitlines()[2].startswith("| a | 1.2 | - |")


@pytest.fixture(scope="module")
def two_levels(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    packs = tmp_path_factory.mktemp("compare-packs")
    return [
        build_pack(
            tiny_build_options(
                tiny_source, packs, quantization=levels.resolve(q), min_top1=0.0, max_ppl_ratio=100.0
            )
        )
        for q in ("int8", "int4")
    ]


def test_compare_measures_each_pack_and_draws_the_chart(two_levels: list[Path], tmp_path: Path) -> None:
    png = tmp_path / "levels.png"
    cmd = [
        sys.executable,
        "-m",
        "model_packs.cli",
        "--log-level",
        "warning",
        "compare",
        *map(str, two_levels),
    ]
    out = subprocess.run(
        [*cmd, "--rounds", "1", "--threads", "1", "--json", "--png", str(png)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["level"] for r in rows] == ["int8-block32", "int4-block32"]
    for row in rows:
        assert row["rss_after_load_mb"] > 0 and row["decode_tok_s"] > 0 and row["prefill_long_ms"] > 0
        assert row["long_prompt_tokens"] > row["short_prompt_tokens"]
        assert row["size_mb"] > 0 and 0 <= row["top1"] <= 1
    assert rows[0]["golden_agreement"] == 1.0  # the reference against itself
    on_disk = [sum(f.stat().st_size for f in p.iterdir()) for p in two_levels]
    assert on_disk[1] < on_disk[0] and rows[1]["size_mb"] <= rows[0]["size_mb"]  # MB to 0.1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_a_damaged_pack_with_its_code(two_levels: list[Path], tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(two_levels[0], bad)
    (bad / "weights.bin").write_bytes(b"x")
    out = subprocess.run(
        [sys.executable, "-m", "model_packs.cli", "compare", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0 and "file_mismatch" in out.stderr
