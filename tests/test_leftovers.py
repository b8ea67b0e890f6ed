"""Nothing left behind: the private broker's and the demo's folders, pytest's temporary
directories, and a demo whose questions fail says so with its exit status."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent import demo
from agent.localbroker import LocalBroker
from model_packs.format import default_pack_path

ROOT = Path(__file__).resolve().parent.parent


def _subprocess_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The project importable, and every temporary folder made under ``tmp`` (TMPDIR)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp), **extra}


def _left_in(tmp: Path) -> list[str]:
    """What a run left in its TMPDIR. onnxruntime's native library keeps one 51-byte ``.ses``
    file there (a timestamp and an id, rewritten by every process that loads it): not ours."""
    return sorted(p.name for p in tmp.iterdir() if p.name != ".ses")


def test_a_broker_removes_the_folder_it_made_and_only_that(tmp_path: Path) -> None:
    closed = LocalBroker().start()
    own = closed.dir
    assert (own / "mosquitto.conf").is_file()
    closed.close()
    assert not own.exists()

    stopped = LocalBroker().start()
    own = stopped.dir
    stopped.stop()  # as the demo did: stopped, never closed
    del stopped
    gc.collect()
    assert not own.exists()

    given = tmp_path / "broker"
    given.mkdir()
    theirs = LocalBroker(workdir=given).start()
    theirs.stop()
    del theirs
    gc.collect()
    assert (given / "mosquitto.conf").is_file()  # a caller's folder stays until close()


def test_a_process_that_exits_without_closing_its_broker_leaves_no_folder(tmp_path: Path) -> None:
    script = "from agent.localbroker import LocalBroker\nb = LocalBroker().start()\nb.stop()\nprint(b.dir)\n"
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=_subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).parent == tmp_path
    assert _left_in(tmp_path) == []


def test_the_demo_counts_questions_that_get_no_answer(
    broker: LocalBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    """No agent answers on this broker: every question and read fails, and each is counted."""
    assert demo.ask(broker.url, timeout_s=1) == demo.STEPS
    out = capsys.readouterr().out
    assert "error [no_reply]" in out


def test_a_failing_demo_exits_non_zero_and_keeps_only_the_agents_log(tmp_path: Path) -> None:
    """The agent cannot start (no pack in an empty cache): the demo exits 1, the broker's folder
    is gone and the demo's folder is kept for its log, which it names."""
    cache = tmp_path / "cache"
    temp = tmp_path / "tmp"
    temp.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "agent.demo"],
        env=_subprocess_env(temp, EDGE_SLM_CACHE=str(cache)),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    left = _left_in(temp)
    assert len(left) == 1 and left[0].startswith("edge-demo-"), left
    assert f"the agent's log is kept in {temp / left[0] / 'agent.log'}" in done.stderr
    assert (temp / left[0] / "agent.log").read_text()


@pytest.mark.realpack
def test_the_demo_passes_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """``make demo``'s last step as it runs there, with the default pack built by ``make``."""
    if not default_pack_path().exists():
        pytest.skip("the default pack is not built (make pack)")
    done = subprocess.run(
        [sys.executable, "-m", "agent.demo"],
        env=_subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "== exact read: soil moisture trend" in done.stdout
    assert _left_in(tmp_path) == []


def test_pytest_keeps_the_temporary_folders_of_failed_tests_only(tmp_path: Path) -> None:
    """The project's pytest settings, in a session of their own: a passing test's tmp_path is
    removed at once, a failing one's kept (the default keeps every test's, three sessions deep)."""
    tests = tmp_path / "inner"
    tests.mkdir()
    (tests / "test_inner.py").write_text(
        textwrap.dedent(
            """
            from pathlib import Path

            def test_passes(tmp_path: Path) -> None:
                (tmp_path / "artefact").write_bytes(b"x" * 1000)

            def test_fails(tmp_path: Path) -> None:
                (tmp_path / "artefact").write_bytes(b"x" * 1000)
                assert False
            """
        )
    )
    root = tmp_path / "root"
    root.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
         "--rootdir", str(tests), str(tests)],
        env={**os.environ, "PYTEST_DEBUG_TEMPROOT": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout
    kept = sorted(p.parent.name for p in root.rglob("artefact"))
    assert kept == ["test_fails0"], kept
