"""Guest instructions per decoded token, per emulated CPU model: a deterministic stand-in for
speed, since wall time under emulation does not predict a board.

Debian's qemu-user has no TCG plugin support (static build), so this builds qemu-aarch64 and
its ``libinsn.so`` counting plugin from Debian's own source package of the installed
qemu-user-static (same version, same patches) once, into ``$EDGE_SLM_CACHE/arm64/qemu-plugins-*``.
The probe runs the device's python3 and venv from the harness's root (``qemu -L``), one
onnxruntime thread, ``PYTHONHASHSEED=0``; two runs that differ only in the number of decoded
tokens give the cost of one decode step (engine, onnxruntime and the Python loop).

    .venv/bin/python tests/arm64/insns.py [--cpu cortex-a72] [--pack DIR] [--tokens 8 40]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import harness

HERE = Path(__file__).resolve().parent
BUILD_DEPS = ("gcc", "meson", "ninja-build", "libglib2.0-dev", "pkg-config", "dpkg-dev")


def ensure_qemu(base: Path) -> tuple[Path, Path]:
    """qemu-aarch64 with plugins and libinsn.so, built from Debian's source of the installed qemu."""
    version = harness.sh(["dpkg-query", "-W", "-f", "${source:Version}", "qemu-user-static"]).stdout.strip()
    out = base / f"qemu-plugins-{re.sub(r'[^A-Za-z0-9.+-]', '_', version)}"
    qemu, plugin = out / "qemu-aarch64", out / "libinsn.so"
    if qemu.exists() and plugin.exists():
        return qemu, plugin
    harness.log(f"building qemu-aarch64 {version} with TCG plugins from Debian's source (a few minutes)")
    harness.sh(
        ["apt-get", "install", "-y", "-qq", *BUILD_DEPS],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "lists/partial").mkdir(parents=True)
        (t / "sources.list").write_text(
            f"deb-src {harness.MIRROR} bookworm main\n"
            "deb-src http://deb.debian.org/debian-security bookworm-security main\n"
        )
        apt = [
            f"-o=Dir::Etc::sourcelist={t / 'sources.list'}",
            "-o=Dir::Etc::sourceparts=-",
            f"-o=Dir::State::lists={t / 'lists'}",
        ]
        harness.sh(["apt-get", *apt, "update"])
        harness.sh(["apt-get", *apt, "source", "--download-only", f"qemu={version}"], cwd=t)
        dsc = next(t.glob("qemu_*.dsc"))
        harness.sh(["dpkg-source", "-x", str(dsc), str(t / "qemu")])
        build = t / "qemu/build"
        build.mkdir()
        configure = [
            "../configure",
            "--target-list=aarch64-linux-user",
            "--enable-plugins",
            "--disable-system",
        ]
        harness.sh([*configure, "--disable-tools", "--disable-docs", "--disable-werror"], cwd=build)
        harness.sh(["ninja", "qemu-aarch64", "tests/plugin/libinsn.so"], cwd=build)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "qemu-aarch64", qemu)
        shutil.copy2(build / "tests/plugin/libinsn.so", plugin)
    return qemu, plugin


def count(
    dev: harness.Device, qemu: Path, plugin: Path, cpu: harness.CpuModel, tokens: int, pack: Path
) -> int:
    """Guest instructions of one probe run (every thread; onnxruntime computes on one)."""
    root = dev.root.path
    cpuinfo = dev.root.work / f"cpuinfo-{cpu.qemu}"
    cpuinfo.write_text(cpu.cpuinfo(os.cpu_count() or 1))
    site = next((root / dev.venv.relative_to("/") / "lib").glob("python3*/site-packages"))
    env = {
        "QEMU_LD_PREFIX": str(root),  # guest paths are looked up in the root first
        "PYTHONPATH": "/" + str(site.relative_to(root)),
        "PYTHONHASHSEED": "0",
        "EDGE_SLM_CACHE": str(dev.cache),
    }
    argv = [str(qemu), "-cpu", cpu.qemu, "-plugin", f"{plugin},inline=on", "-d", "plugin"]
    argv += [str(root / "usr/bin/python3"), str(HERE / "decode_probe.py"), str(tokens), "--pack", str(pack)]
    # the ARM-style cpuinfo goes where -L finds it first: a tmpfs over the root's /proc
    script = (
        f"mount -t tmpfs tmpfs {shlex.quote(str(root / 'proc'))} && "
        f"cp {shlex.quote(str(cpuinfo))} {shlex.quote(str(root / 'proc/cpuinfo'))} && "
        f"exec env {' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())} {shlex.join(argv)}"
    )
    done = harness.sh(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    if probe["tokens"] != tokens:
        raise SystemExit(f"arm64: probe decoded {probe['tokens']} tokens, not {tokens}")
    m = re.search(r"insns: (\d+)", done.stderr + done.stdout)
    if not m:
        raise SystemExit(f"arm64: no instruction count from the plugin:\n{done.stderr}")
    return int(m.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="append", choices=sorted(harness.CPU_MODELS))
    p.add_argument("--pack", type=Path, action="append", help="pack directory (default: the default pack)")
    p.add_argument("--tokens", type=int, nargs=2, default=[8, 40], metavar=("FEW", "MANY"))
    p.add_argument("--onnxruntime", help="install this onnxruntime version instead of pyproject's range")
    args = p.parse_args()
    dev = harness.prepare(onnxruntime=args.onnxruntime)
    qemu, plugin = ensure_qemu(dev.cache / "arm64")
    few, many = args.tokens
    for pack in args.pack or [dev.cache / "packs/smollm2-135m-instruct-1.0.0"]:
        for cpu in (harness.CPU_MODELS[c] for c in (args.cpu or sorted(harness.CPU_MODELS))):
            a = count(dev, qemu, plugin, cpu, few, pack)
            b = count(dev, qemu, plugin, cpu, many, pack)
            row = {
                "pack": pack.name,
                "cpu": cpu.qemu,
                "insns_per_token": round((b - a) / (many - few)),
                f"insns_{few}_tokens": a,
                f"insns_{many}_tokens": b,
                "runtime": dev.installed,
            }
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
