"""The x86_64 onnxruntime floor tested at the floor itself: the default pack runs on the
floor release, and the release below it is refused with ``runtime_mismatch`` by the device
(and really cannot run the graph: the floor is measured, not assumed). The aarch64 floor is
tested the same way under emulation: ``tests/arm64/harness.py --onnxruntime VERSION``.

Each onnxruntime release is installed once with ``pip install --target`` into the cache
(``$EDGE_SLM_CACHE/onnxruntime/VERSION``, from PyPI) and put first on ``PYTHONPATH``: the rest
of the venv (numpy, tokenizers) is the one the tests run with.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model_packs import runtimes
from model_packs.format import cache_root

pytestmark = [
    pytest.mark.realpack,
    pytest.mark.skipif(runtimes.machine() != "x86_64", reason="the x86_64 floor; arm64 has its harness"),
]
FLOOR = runtimes.ORT_FLOORS["x86_64"]
BELOW = "1.21.1"  # the newest release below the floor


def _onnxruntime(version: str) -> Path:
    """onnxruntime==version alone (its dependencies are the venv's), installed once."""
    target = cache_root() / "onnxruntime" / version
    if not (target / ".complete").exists():
        pip = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--upgrade",
            "--target",
            str(target),
        ]
        subprocess.run([*pip, f"onnxruntime=={version}"], check=True, timeout=600)
        (target / ".complete").write_text(version)
    return target


def _run(version: str, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_onnxruntime(version)), os.getcwd()])}
    return subprocess.run([sys.executable, "-c", code], env=env, text=True, capture_output=True, timeout=300)


ASK = """
import onnxruntime, sys
from agent.cli import main
print("onnxruntime", onnxruntime.__version__, file=sys.stderr)
sys.exit(main(["ask", "What is the capital of France?", "--max-tokens", "6", "--threads", "1"]))
"""


def test_the_default_pack_answers_on_the_floor_release(real_pack_path: Path) -> None:
    done = _run(FLOOR, ASK)
    assert f"onnxruntime {FLOOR}" in done.stderr
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip(), done.stderr[-2000:]


def test_the_release_below_the_floor_is_refused_with_runtime_mismatch(real_pack_path: Path) -> None:
    done = _run(BELOW, ASK)
    assert f"onnxruntime {BELOW}" in done.stderr
    assert done.returncode != 0
    assert "runtime_mismatch" in done.stderr and f"needs onnxruntime >= {FLOOR} on x86_64" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_release_below_the_floor_really_cannot_run_the_graph(real_pack_path: Path) -> None:
    """Without the device's check in front, onnxruntime itself refuses the 8-bit graph: the
    floor is where the runtime stops working, not a number picked for safety."""
    code = (
        "import sys, onnxruntime as ort\n"
        f"ort.InferenceSession({str(real_pack_path / 'model.onnx')!r}, providers=['CPUExecutionProvider'])\n"
        "print('loaded')\n"
    )
    below = _run(BELOW, code)
    assert below.returncode != 0 and "Only 4b quantization is supported" in below.stderr, below.stderr[-2000:]
    at = _run(FLOOR, code)
    assert at.returncode == 0 and "loaded" in at.stdout, at.stderr[-2000:]
