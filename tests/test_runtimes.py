"""The onnxruntime floors: one table (model_packs/runtimes.py) that pyproject, the builder's
manifest and the device's checks all follow."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from agent.inference.pack import check_onnxruntime
from model_packs import runtimes
from model_packs.errors import RuntimeRequirementError
from model_packs.format import read_manifest

REPO = Path(__file__).resolve().parents[1]


def _pyproject_floor(machine: str) -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = {"platform_machine": machine}
    found = []
    for dep in map(Requirement, deps):
        if dep.name == "onnxruntime" and (dep.marker is None or dep.marker.evaluate(env)):
            found.append(dep)
    assert len(found) == 1, f"exactly one onnxruntime requirement must apply on {machine}: {found}"
    (spec,) = found[0].specifier
    assert spec.operator == ">="
    return spec.version


@pytest.mark.parametrize(
    ("platform_machine", "arch"),
    [("x86_64", "x86_64"), ("AMD64", "x86_64"), ("aarch64", "aarch64"), ("arm64", "aarch64")],
)
def test_pyproject_states_the_measured_floor_for_each_machine(platform_machine: str, arch: str) -> None:
    assert runtimes.machine(platform_machine) == arch
    assert _pyproject_floor(platform_machine) == runtimes.ORT_FLOORS[arch]


def test_an_unnamed_machine_gets_the_highest_floor_everywhere() -> None:
    highest = max(runtimes.ORT_FLOORS.values(), key=runtimes.version_tuple)
    assert _pyproject_floor("riscv64") == highest
    any_machine, by_machine = runtimes.manifest_floors()
    assert runtimes.required_for(any_machine, by_machine, "riscv64") == highest
    for arch, floor in runtimes.ORT_FLOORS.items():
        assert runtimes.required_for(any_machine, by_machine, arch) == floor


@pytest.mark.parametrize(
    ("installed", "arch", "refused"),
    [
        ("1.21.1", "x86_64", True),
        ("1.22.0", "x86_64", False),
        ("1.22.1", "aarch64", True),  # loads, then fails at the first run on aarch64
        ("1.23.0", "aarch64", False),
        ("1.23.0+cpu", "aarch64", False),
        ("1.30.0", "riscv64", False),
        ("1.22.5", "riscv64", True),
    ],
)
def test_the_device_refuses_a_runtime_below_its_machines_floor(
    real_pack_path: Path, installed: str, arch: str, refused: bool
) -> None:
    manifest = read_manifest(real_pack_path)
    if not refused:
        check_onnxruntime(manifest, installed, arch)
        return
    with pytest.raises(RuntimeRequirementError, match=rf"needs onnxruntime >= [\d.]+ on {arch}") as err:
        check_onnxruntime(manifest, installed, arch)
    assert err.value.code == "runtime_mismatch"
    assert "pip install 'onnxruntime>=" in err.value.message


def test_the_default_pack_states_the_floors(real_pack_path: Path) -> None:
    rt = read_manifest(real_pack_path).runtime
    any_machine, by_machine = runtimes.manifest_floors()
    assert (rt.onnxruntime, dict(rt.onnxruntime_by_machine)) == (any_machine, by_machine)
