"""Pack loading and verification: each failure has its own code and names the culprit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.inference import load_pack
from model_packs.errors import ManifestError, PackFileError, RuntimeRequirementError
from model_packs.format import read_manifest, verify_pack


@pytest.fixture()
def pack_copy(tiny_pack_path: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_pack_path, tmp_path / "pack"))


def _edit_manifest(pack: Path, edit: dict[str, object]) -> None:
    path = pack / "manifest.json"
    data = json.loads(path.read_text())
    for dotted, value in edit.items():  # keys are '/'-separated paths
        node = data
        *parents, last = dotted.split("/")
        for p in parents:
            node = node[p]
        if value is None:
            del node[last]
        else:
            node[last] = value
    path.write_text(json.dumps(data))


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a model pack") as err:
        load_pack(tmp_path)
    assert err.value.code == "bad_manifest"


def test_manifest_not_json(pack_copy: Path) -> None:
    (pack_copy / "manifest.json").write_text("{nope")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_pack(pack_copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"architecture/num_layers": None}, "architecture.num_layers is missing"),
        ({"architecture/hidden_size": "64"}, "architecture.hidden_size must be int"),
        ({"version": "one"}, "not SemVer"),
        ({"format": 99}, "format 99 is not supported"),
        ({"files/model.onnx": None}, "does not list 'model.onnx'"),
    ],
)
def test_manifest_field_errors_name_the_field(pack_copy: Path, edit: dict[str, object], message: str) -> None:
    _edit_manifest(pack_copy, edit)
    with pytest.raises(ManifestError, match=message):
        load_pack(pack_copy)


def test_changed_file_is_named(pack_copy: Path) -> None:
    with (pack_copy / "weights.bin").open("r+b") as fh:
        fh.seek(64)
        byte = fh.read(1)
        fh.seek(64)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(PackFileError, match=r"weights.bin: sha256") as err:
        load_pack(pack_copy)
    assert err.value.code == "file_mismatch"


def test_truncated_and_missing_files_are_named(pack_copy: Path) -> None:
    with (pack_copy / "embed.bin").open("r+b") as fh:
        fh.truncate(10)
    (pack_copy / "tokenizer.json").unlink()
    with pytest.raises(PackFileError) as err:
        verify_pack(pack_copy)
    assert "embed.bin: length 10" in err.value.message
    assert "tokenizer.json: missing" in err.value.message


def test_path_escaping_the_pack_is_refused(pack_copy: Path) -> None:
    data = json.loads((pack_copy / "manifest.json").read_text())
    data["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "length": 1}
    (pack_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="escapes the pack"):
        read_manifest(pack_copy)


def test_onnxruntime_too_old_for_the_pack(pack_copy: Path) -> None:
    from model_packs.runtimes import machine

    _edit_manifest(pack_copy, {"runtime/onnxruntime_by_machine": {machine(): ">=99.0.0"}})
    with pytest.raises(
        RuntimeRequirementError, match=rf"needs onnxruntime >= 99\.0\.0 on {machine()}"
    ) as err:
        load_pack(pack_copy)
    assert err.value.code == "runtime_mismatch"


def test_a_pack_without_floors_by_machine_is_held_to_its_one_floor(pack_copy: Path) -> None:
    """Packs of builder 2 state one floor; it applies on every machine."""
    _edit_manifest(pack_copy, {"runtime/onnxruntime_by_machine": None, "runtime/onnxruntime": ">=99.0.0"})
    with pytest.raises(RuntimeRequirementError, match=r"needs onnxruntime >= 99\.0\.0"):
        load_pack(pack_copy)


def test_floors_by_machine_must_be_version_floors(pack_copy: Path) -> None:
    _edit_manifest(pack_copy, {"runtime/onnxruntime_by_machine": {"x86_64": "<2"}})
    with pytest.raises(ManifestError, match="onnxruntime_by_machine must map"):
        read_manifest(pack_copy)


def test_not_enough_ram(pack_copy: Path) -> None:
    _edit_manifest(pack_copy, {"runtime/min_ram_mb": 10**9})
    with pytest.raises(RuntimeRequirementError, match="MB of free RAM"):
        load_pack(pack_copy)


def test_unavailable_execution_provider(pack_copy: Path) -> None:
    _edit_manifest(pack_copy, {"runtime/execution_providers": ["NoSuchExecutionProvider"]})
    with pytest.raises(RuntimeRequirementError, match="NoSuchExecutionProvider"):
        load_pack(pack_copy)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


def test_edge_pack_verify_and_inspect(pack_copy: Path) -> None:
    ok = _cli("model_packs.cli", "verify", str(pack_copy))
    assert ok.returncode == 0 and "files match the manifest" in ok.stdout
    shown = _cli("model_packs.cli", "inspect", str(pack_copy))
    assert shown.returncode == 0 and "top-1 agreement" in shown.stdout and "golden" in shown.stdout
    (pack_copy / "chat_template.jinja").write_text("{{ changed }}")
    bad = _cli("model_packs.cli", "verify", str(pack_copy))
    assert bad.returncode == 2
    assert "[file_mismatch]" in bad.stderr and "chat_template.jinja" in bad.stderr


def test_edge_agent_ask_streams_and_reports_usage(tiny_pack_path: Path) -> None:
    done = _cli(
        "agent.cli",
        "ask",
        "--pack",
        str(tiny_pack_path),
        "--max-tokens",
        "8",
        "--temperature",
        "0.8",
        "--seed",
        "4",
        "temperature?",
    )
    assert done.returncode == 0, done.stderr
    assert "prompt" in done.stderr and "tokens/s" in done.stderr and "time to first token" in done.stderr
    again = _cli(
        "agent.cli",
        "ask",
        "--pack",
        str(tiny_pack_path),
        "--max-tokens",
        "8",
        "--temperature",
        "0.8",
        "--seed",
        "4",
        "temperature?",
    )
    assert again.stdout == done.stdout


def test_edge_agent_ask_errors_have_codes(tiny_pack_path: Path, tmp_path: Path) -> None:
    missing = _cli("agent.cli", "ask", "--pack", str(tmp_path), "hi")
    assert missing.returncode == 2 and "[bad_manifest]" in missing.stderr
    too_long = _cli("agent.cli", "ask", "--pack", str(tiny_pack_path), "--max-tokens", "5000", "hi")
    assert too_long.returncode == 2 and "[too_large]" in too_long.stderr and "128" in too_long.stderr


def test_every_file_the_pack_uses_is_listed_and_nothing_else_is_there(pack_copy: Path) -> None:
    """The chat template too: unlisted, it was neither hashed nor confined (`../x` read any file)."""
    _edit_manifest(pack_copy, {"tokenizer/chat_template_file": "../../etc/passwd"})
    with pytest.raises(ManifestError, match=r"does not list '\.\./\.\./etc/passwd'"):
        verify_pack(pack_copy)


def test_an_unlisted_file_in_the_pack_is_refused(pack_copy: Path) -> None:
    (pack_copy / "extra.bin").write_bytes(b"smuggled")
    with pytest.raises(ManifestError, match=r"does not list: \['extra.bin'\]"):
        verify_pack(pack_copy)


def test_tar_members_must_be_unique_and_few() -> None:
    import tarfile

    from agent.packs.verify import MAX_MEMBERS, UpdateRejected, check_members

    def member(name: str) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size = 1
        return info

    with pytest.raises(UpdateRejected, match="appears twice"):
        check_members([member("manifest.json"), member("a"), member("a")], 1 << 20)
    with pytest.raises(UpdateRejected, match=f"more than {MAX_MEMBERS}"):
        check_members([member(f"f{i}") for i in range(MAX_MEMBERS + 1)], 1 << 20)


def test_publish_packs_only_real_listed_files(pack_copy: Path, tmp_path: Path) -> None:
    from fleet.errors import RepositoryError
    from fleet.repository import FleetRepository

    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    (tmp_path / "elsewhere.json").write_bytes((pack_copy / "tokenizer.json").read_bytes())
    (pack_copy / "tokenizer.json").unlink()
    (pack_copy / "tokenizer.json").symlink_to(tmp_path / "elsewhere.json")  # same bytes: hashes pass
    with pytest.raises(RepositoryError, match="not a regular file"):
        repo.publish(pack_copy)
