"""The shipped systemd unit, as systemd itself judges its exposure (SIGHUP reload:
test_agent_runtime), and the documentation it names, as the package installs it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "edge-agent.service"


def test_the_unit_stays_as_tight_as_measured() -> None:
    """`systemd-analyze security` offline: 3.2 before the hardening of issue 9, 1.4 after."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian: systemd)"
    done = subprocess.run(
        [analyze, "security", "--offline=true", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout + done.stderr)
    assert score, done.stdout + done.stderr
    assert float(score.group(1)) <= 1.4, done.stdout


def unit_values(key: str) -> list[str]:
    """Every value of ``key=`` in the unit (a key may repeat; a value may list several words)."""
    text = UNIT.read_text(encoding="utf-8")
    return [word for m in re.finditer(rf"^{key}=(.*)$", text, re.M) for word in m.group(1).split()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel `pip install` of this tree would install (built from a copy: nothing written here)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    )
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "-w", str(out), "."],
        cwd=src,
        check=True,
        timeout=300,
    )
    (built,) = out.glob("*.whl")
    return zipfile.ZipFile(built)


def test_documentation_names_files_the_package_installs(wheel: zipfile.ZipFile) -> None:
    """Documentation= must name files present on a device: the wheel's data files land under
    the venv's prefix, which ExecStart shows (``<prefix>/bin/edge-agent``)."""
    (exec_start,) = [w for w in unit_values("ExecStart") if w.endswith("/bin/edge-agent")]
    prefix = exec_start.removesuffix("/bin/edge-agent")
    docs = unit_values("Documentation")
    assert docs, "the unit has no Documentation="
    data = {n.split(".data/data/", 1)[1] for n in wheel.namelist() if ".data/data/" in n}
    for uri in docs:
        assert uri.startswith(f"file:{prefix}/"), f"{uri}: not a file the device install has"
        assert uri.removeprefix(f"file:{prefix}/") in data, f"{uri}: the wheel installs only {sorted(data)}"


def test_the_wheel_carries_the_stated_license(wheel: zipfile.ZipFile) -> None:
    metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    text = wheel.read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text and "License-File: LICENSE" in text, text[:800]
    shipped = next(n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE"))
    assert wheel.read(shipped) == (ROOT / "LICENSE").read_bytes()


def test_the_i2c_drop_in_of_the_sensor_guide_parses_and_stays_tight(tmp_path: Path) -> None:
    """docs/sensors.md's drop-in for command sources that open /dev/i2c-*, applied after the
    unit as systemd applies a drop-in: every key known, and the exposure measured with it
    (1.6: only PrivateDevices= gives way, DevicePolicy=closed keeps every other device out)."""
    guide = (ROOT / "docs" / "sensors.md").read_text(encoding="utf-8")
    (drop_in,) = re.findall(r"^```ini\n(.*?)^```$", guide, re.S | re.M)
    merged = tmp_path / "edge-agent.service"
    merged.write_text(UNIT.read_text(encoding="utf-8") + "\n" + drop_in, encoding="utf-8")
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian: systemd)"
    done = subprocess.run(
        [analyze, "security", "--offline=true", str(merged)], capture_output=True, text=True, timeout=60
    )
    out = done.stdout + done.stderr
    assert "Unknown key" not in out and "ignoring" not in out, out
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
    assert score and float(score.group(1)) <= 1.6, out
