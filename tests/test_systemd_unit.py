"""The shipped systemd unit, as systemd itself judges its exposure (SIGHUP reload: test_agent_runtime)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "edge-agent.service"


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
