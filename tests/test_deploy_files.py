"""Deployment files (no systemd or Docker engine here): syntax and the settings that matter."""

from __future__ import annotations

import configparser
from pathlib import Path

import yaml

from agent.config import load_config

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
