"""Shared fixtures: a tiny model and pack built per session, the real default pack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.inference import Engine, LoadedPack, load_pack
from model_packs.build.builder import BuildOptions, build_pack
from model_packs.format import default_pack_path
from tests.tiny_model import write_hf_dir


def tiny_build_options(source: Path, packs: Path, **overrides: object) -> BuildOptions:
    base: dict[str, object] = dict(
        name="tiny",
        version="0.0.1",
        packs_dir=packs,
        source=source,
        context_length=128,
        max_tokens=32,
        golden_prompts=("temperature?", "humidity?"),
        golden_tokens=8,
        heldout_tokens=256,
        eval_chunk=64,
        min_top1=0.8,
        max_ppl_ratio=1.1,
    )
    base.update(overrides)
    return BuildOptions(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_dir(tmp_path_factory.mktemp("tiny-hf"))


@pytest.fixture(scope="session")
def tiny_pack_path(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pack(tiny_build_options(tiny_source, tmp_path_factory.mktemp("packs")))


@pytest.fixture(scope="session")
def tiny_pack(tiny_pack_path: Path) -> LoadedPack:
    return load_pack(tiny_pack_path, check_ram=False)


@pytest.fixture()
def tiny_engine(tiny_pack: LoadedPack) -> Iterator[Engine]:
    yield Engine(tiny_pack, threads=1)


@pytest.fixture(scope="session")
def real_pack_path() -> Path:
    path = default_pack_path()
    if not (path / "manifest.json").exists():
        pytest.fail(f"the default pack is not built at {path}: run `make pack` (make test does)")
    return path


@pytest.fixture(scope="session")
def real_engine(real_pack_path: Path) -> Engine:
    return Engine(load_pack(real_pack_path), threads=2)
