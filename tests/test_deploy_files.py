"""Deployment files (no systemd or Docker engine here): syntax and the settings that matter."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

from agent.config import load_config
from agent.localbroker import LocalBroker

ROOT = Path(__file__).resolve().parent.parent


def test_systemd_unit_is_notify_with_watchdog_and_hardening() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "systemd" / "edge-agent.service")
    svc = unit["Service"]
    assert svc["Type"] == "notify" and int(svc["WatchdogSec"]) > 0 and svc["Restart"] == "on-failure"
    assert "edge-agent run --config /etc/edge-agent/agent.yaml" in svc["ExecStart"]
    for key in ("ProtectSystem", "NoNewPrivileges", "PrivateTmp", "StateDirectory", "MemoryMax"):
        assert svc.get(key), key
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_sample_config_is_valid() -> None:
    cfg = load_config(ROOT / "systemd" / "agent.yaml", env={})
    assert cfg.device_id == "greenhouse-1" and len(cfg.sensors) == 4
    assert cfg.sensors[3].source.type == "file" and cfg.sensors[3].source.scale == 0.001


def test_compose_balena_and_dockerfile() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"agent", "mosquitto"}
    assert compose["services"]["agent"]["build"] == "."
    balena = yaml.safe_load((ROOT / "balena.yml").read_text())
    assert balena["type"] == "sw.application" and "raspberrypi4-64" in balena["data"]["supportedDeviceTypes"]
    lines = [
        ln.split()[0]
        for ln in (ROOT / "Dockerfile").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    assert lines[0] == "FROM" and "CMD" in lines
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            src = line.split()[1]
            assert (ROOT / src).exists(), src
    assert "[build]" not in (ROOT / "Dockerfile").read_text()  # the device image has no torch


def test_the_unit_runs_as_the_user_that_alone_may_read_the_config() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "systemd" / "edge-agent.service")
    assert unit["Service"]["User"] == unit["Service"]["Group"] == "edge-agent"
    readme = (ROOT / "README.md").read_text()
    assert "install -D -m 0640 -g edge-agent systemd/agent.yaml" in readme and "useradd --system" in readme


def _mosquitto_options(text: str) -> list[tuple[str, str]]:
    """(option, value) for each setting of a mosquitto config, comments and blank lines left out."""
    options = []
    for line in (ln.strip() for ln in text.splitlines()):
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            options.append((key, value.strip()))
    return options


def test_every_shipped_broker_config_sends_replies_at_once() -> None:
    """set_tcp_nodelay: without it a small reply waits for the client's delayed ACK (Nagle), and
    a read's round trip took 47 ms instead of 1 ms (bench/mqtt.py). Every config the project
    ships: the compose/balena broker, the drop-in for Debian's mosquitto, the demo's and tests'."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    context = ROOT / compose["services"]["mosquitto"]["build"]
    assert "COPY mosquitto.conf " in (context / "Dockerfile").read_text()  # the file checked is the one used
    shipped = sorted((ROOT / "deploy").rglob("*.conf"))
    assert (
        context / "mosquitto.conf" in shipped and ROOT / "deploy/mosquitto/conf.d/edge-agent.conf" in shipped
    )
    configs = {str(p.relative_to(ROOT)): p.read_text() for p in shipped}
    broker = LocalBroker(workdir=Path(tempfile.mkdtemp(prefix="edge-mosquitto-")))
    try:
        configs["agent/localbroker.py (make demo)"] = broker.conf.read_text()
    finally:
        broker.close()
    for name, text in configs.items():
        options = _mosquitto_options(text)
        assert ("set_tcp_nodelay", "true") in options, name
        assert [v for k, v in options if k == "set_tcp_nodelay"] == ["true"], name


def test_the_drop_in_for_debians_mosquitto_runs() -> None:
    """The drop-in as mosquitto reads it (beside the listener Debian's package keeps)."""
    drop_in = (ROOT / "deploy/mosquitto/conf.d/edge-agent.conf").read_text()
    with LocalBroker(listener_conf=drop_in) as broker:
        assert broker.proc is not None and broker.proc.poll() is None
        assert "Error" not in broker.log.read_text()


def _project_copy(dest: Path) -> Path:
    """The files git tracks or would track (a fresh clone plus new files), tests left out."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        if name.startswith("tests/") or not (ROOT / name).is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


def test_installing_the_project_writes_nothing_into_its_source_tree(tmp_path: Path) -> None:
    """``pip install .`` (the device install) builds a wheel in the tree it is given: setuptools
    alone left build/ and an egg-info folder there (tools/build_backend.py keeps them out)."""
    src = _project_copy(tmp_path / "src")
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    wheels = list((tmp_path / "dist").glob("edge_slm_agent-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as whl:
        names = whl.namelist()
    assert (
        "agent/__init__.py" in names and "model_packs/__init__.py" in names and "fleet/__init__.py" in names
    )
    assert not any(n.startswith(("tools/", "tests/")) for n in names)
    after = sorted(p.relative_to(src) for p in src.rglob("*") if "__pycache__" not in p.parts)
    assert after == [p for p in before if "__pycache__" not in p.parts]


def _dockerfile_context(dest: Path) -> Path:
    """The image's WORKDIR as the Dockerfile's COPY lines fill it before ``RUN pip install .``."""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("RUN pip install ."):
            return dest
        if not line.startswith("COPY "):
            continue
        *sources, target = line.split()[1:]
        for name in sources:
            into = dest / target / Path(name).name if target.endswith("/") else dest / target
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, into, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, into)
    raise AssertionError("the Dockerfile has no RUN pip install .")


def test_the_device_images_pip_install_builds_from_what_the_dockerfile_copies(tmp_path: Path) -> None:
    """Everything the build reads (the backend's folder, README and LICENSE, the docs installed
    as data files) must be copied into the image before its ``pip install .``."""
    src = _dockerfile_context(tmp_path / "image")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("edge_slm_agent-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
    data = [n for n in names if ".data/data/share/doc/" in n]
    for path in (ROOT / "docs").glob("*.md"):
        assert any(n.endswith(f"/docs/{path.name}") for n in data), path.name
