"""The device side on arm64, under qemu user-mode emulation: ``make test-arm64``.

What it proves, per CPU model (Cortex-A72 = Raspberry Pi 4, ARMv8.0 without dot-product;
Cortex-A76 = Raspberry Pi 5):

1. the device install (``pip install .``, no extras) works from PyPI's aarch64 wheels on
   Debian bookworm's own ``python3`` (3.11.2, what Raspberry Pi OS ships), nothing compiled;
2. ``edge-agent ask`` answers on the default pack;
3. ``edge-agent pack install`` (a sideload through TUF and the real health gate) activates a
   newer signed release of the same pack and refuses deliberately broken ones.

Everything slow is cached under ``$EDGE_SLM_CACHE/arm64/`` and keyed by what it was made from:
the root filesystem (debootstrap), the aarch64 wheels (``pip download`` on the host) and the
virtual environment with the dependencies inside the root. The project itself is copied and
installed afresh on every run, and the fleet repository and device state are rebuilt, so a
warm run measures today's working tree.

qemu 7.2 (Debian bookworm's) passes the host's x86 ``/proc/cpuinfo`` through, and onnxruntime
1.28 and later crash at import on it; every command in the root runs in a private mount
namespace where an ARM-style cpuinfo for the emulated model is bound over ``/proc/cpuinfo``.
The CPU model reaches qemu through ``QEMU_CPU`` (the binfmt_misc handler is qemu-aarch64, so
every process the guest starts is emulated with the same model).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
MIRROR = os.environ.get("EDGE_SLM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
ROOT_PACKAGES = ("python3", "python3-venv")
# bookworm's glibc is 2.36; pip takes each compatible manylinux tag only when it is named
WHEEL_PLATFORMS = [f"manylinux_2_{minor}_aarch64" for minor in range(36, 16, -1)] + ["manylinux2014_aarch64"]
PYTHON_VERSION = "3.11"
QEMU_BINFMT = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
HWCAP_ASIMDDP = 1 << 20  # arm64 AT_HWCAP bit for the dot-product instructions
ASK_QUESTION = "What is the capital of France?"


@dataclass(frozen=True)
class CpuModel:
    """An emulated board: qemu's CPU model and the /proc/cpuinfo such a board shows."""

    qemu: str
    board: str
    part: str
    variant: str
    revision: int
    features: str
    dotprod: bool

    def cpuinfo(self, cpus: int) -> str:
        block = (
            "processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: {f}\nCPU implementer\t: 0x41\n"
            "CPU architecture: 8\nCPU variant\t: {v}\nCPU part\t: {p}\nCPU revision\t: {r}\n\n"
        )
        return "".join(
            block.format(n=n, f=self.features, v=self.variant, p=self.part, r=self.revision)
            for n in range(cpus)
        )


CPU_MODELS = {
    m.qemu: m
    for m in (
        CpuModel("cortex-a72", "Raspberry Pi 4", "0xd08", "0x0", 3, "fp asimd evtstrm crc32 cpuid", False),
        CpuModel(
            "cortex-a76",
            "Raspberry Pi 5",
            "0xd0b",
            "0x4",
            1,
            "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
            "asimddp",
            True,
        ),
    )
}


def log(msg: str) -> None:
    print(f"[arm64 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a host command, failing loudly with its output."""
    done = subprocess.run(argv, text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise SystemExit(
            f"arm64: command failed ({done.returncode}): {shlex.join(argv)}\n{done.stdout}{done.stderr}"
        )
    return done  # type: ignore[no-any-return]


def key_of(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- the emulated root


@dataclass
class Root:
    """The arm64 root filesystem and how to run a command inside it."""

    path: Path
    work: Path  # per-run files (cpuinfo, fleet repository, device state): bound at the same path
    binds: list[tuple[Path, bool]] = field(default_factory=list)  # host dirs seen at the same path

    def run(
        self, argv: list[str], cpu: CpuModel, env: dict[str, str] | None = None, timeout: float = 3600
    ) -> subprocess.CompletedProcess[str]:
        cpuinfo = self.work / f"cpuinfo-{cpu.qemu}"
        if not cpuinfo.exists():
            cpuinfo.write_text(cpu.cpuinfo(os.cpu_count() or 1))
        r = shlex.quote(str(self.path))
        mounts = [
            f"mount -t proc proc {r}/proc",
            f"mount --bind {shlex.quote(str(cpuinfo))} {r}/proc/cpuinfo",
            f"mount --rbind /dev {r}/dev",
            f"mount --bind /sys {r}/sys && mount -o remount,bind,ro {r}/sys",
            f"mount -t tmpfs -o size=4g tmpfs {r}/tmp",
        ]
        for host, read_only in [(self.work, False), *self.binds]:
            inside = shlex.quote(f"{self.path}{host}")
            mounts.append(f"mkdir -p {inside} && mount --bind {shlex.quote(str(host))} {inside}")
            if read_only:
                mounts.append(f"mount -o remount,bind,ro {inside}")
        full_env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "QEMU_CPU": cpu.qemu,
            **(env or {}),
        }
        inner = ["chroot", str(self.path), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in full_env.items())]
        script = "set -e\n" + "\n".join(mounts) + "\nexec " + shlex.join([*inner, *argv])
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            text=True,
            capture_output=True,
            timeout=timeout,
        )

    def check(self, argv: list[str], cpu: CpuModel, **kw: object) -> subprocess.CompletedProcess[str]:
        done = self.run(argv, cpu, **kw)  # type: ignore[arg-type]
        if done.returncode != 0:
            raise SystemExit(
                f"arm64: in the root ({cpu.qemu}) failed ({done.returncode}): {shlex.join(argv)}\n"
                f"{done.stdout}{done.stderr}"
            )
        return done


def ensure_binfmt() -> None:
    """aarch64 ELF files run through qemu-aarch64-static (flag F: the handler is opened now,
    so it works inside the root without a copy there)."""
    if not (BINFMT / "status").exists():
        sh(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists():
        if not QEMU_BINFMT.exists():
            raise SystemExit("arm64: qemu-user-static is not installed (apt-get install qemu-user-static)")
        (BINFMT / "register").write_text(QEMU_BINFMT.read_text().strip() + "\n")
    text = entry.read_text()
    if "enabled" not in text.splitlines()[0] or "F" not in re.search(r"flags: (\S*)", text).group(1):  # type: ignore[union-attr]
        raise SystemExit(f"arm64: binfmt_misc's qemu-aarch64 entry is not usable here:\n{text}")


def ensure_rootfs(cache: Path) -> Path:
    """Debian bookworm arm64, minbase plus python3 and python3-venv; built once."""
    key = key_of(SUITE, MIRROR, *ROOT_PACKAGES)
    root = cache / f"rootfs-{SUITE}-{key}"
    if (root / ".edge-slm-complete").exists():
        return root
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    log(f"building the {SUITE} arm64 root filesystem in {root} (debootstrap, a few minutes)")
    started = time.monotonic()
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")  # named for non-Debian hosts
    argv = [
        "debootstrap",
        "--arch=arm64",
        "--variant=minbase",
        f"--include={','.join(ROOT_PACKAGES)}",
        *([f"--keyring={keyring}"] if keyring.exists() else []),
        SUITE,
        str(tmp),
        MIRROR,
    ]
    # debootstrap mounts /proc and /sys in the target: a private namespace takes them away with it
    sh(["unshare", "--mount", "--propagation", "private", *argv])
    for p in (tmp / "var/cache/apt/archives").glob("*.deb"):
        p.unlink()
    (tmp / ".edge-slm-complete").write_text(f"{SUITE} {MIRROR} {' '.join(ROOT_PACKAGES)}\n")
    tmp.rename(root)
    log(f"root filesystem ready in {time.monotonic() - started:.0f} s")
    return root


def prune(base: Path, keep: set[Path], venvs: Path, keep_venvs: set[str]) -> None:
    """One root filesystem and the wheel sets and venvs this run uses are kept, nothing else."""
    stale = [p for p in [*base.glob("rootfs-*"), *base.glob("wheels-*")] if p not in keep]
    stale += [p for p in venvs.glob("venv-*") if p.name not in keep_venvs]
    for p in stale:
        log(f"removing the stale {p}")
        shutil.rmtree(p)


# ---------------------------------------------------------------- the device install


def device_requirements(src: Path, onnxruntime: str | None) -> tuple[list[str], list[str]]:
    """The device install's dependencies (no extras) and the build backend, from pyproject."""
    project = tomllib.loads((src / "pyproject.toml").read_text())
    deps = list(project["project"]["dependencies"])
    if onnxruntime:
        deps = [d for d in deps if not re.match(r"onnxruntime\b", d)] + [f"onnxruntime=={onnxruntime}"]
    return sorted(deps), sorted(project["build-system"]["requires"])


def ensure_wheels(cache: Path, deps: list[str], build: list[str]) -> tuple[Path, str]:
    """PyPI's aarch64 wheels for CPython 3.11, downloaded on the host: nothing may compile."""
    key = key_of(*WHEEL_PLATFORMS, PYTHON_VERSION, *deps, *build)
    wheels = cache / f"wheels-{key}"
    if (wheels / ".edge-slm-complete").exists():
        return wheels, key
    log(f"downloading aarch64 wheels into {wheels}")
    tmp = wheels.with_name(wheels.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "requirements.txt").write_text("\n".join(deps) + "\n")
    (tmp / "build-requirements.txt").write_text("\n".join(build) + "\n")
    for req in ("requirements.txt", "build-requirements.txt"):
        sh(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--only-binary=:all:",
                *(f"--platform={p}" for p in WHEEL_PLATFORMS),
                f"--python-version={PYTHON_VERSION}",
                "--implementation=cp",
                "--dest",
                str(tmp),
                "-r",
                str(tmp / req),
            ]
        )
    (tmp / ".edge-slm-complete").write_text("\n".join(deps) + "\n")
    tmp.rename(wheels)
    return wheels, key


def ensure_venv(root: Root, wheels: Path, key: str) -> Path:
    """A venv of the root's own python3 with the dependencies, installed offline from the wheels."""
    venv = Path(f"/opt/edge-slm/venv-{key}")
    if (root.path / venv.relative_to("/") / ".edge-slm-complete").exists():
        return venv
    log(f"creating {venv} in the root and installing the wheels (emulated pip, a few minutes)")
    started = time.monotonic()
    cpu = CPU_MODELS["cortex-a76"]
    host_venv = root.path / venv.relative_to("/")
    shutil.rmtree(host_venv, ignore_errors=True)
    root.check(["python3", "-m", "venv", str(venv)], cpu)
    pip = [f"{venv}/bin/pip", "install", "-q", "--no-index", "--find-links", str(wheels)]
    root.check([*pip, "--only-binary=:all:", "-r", str(wheels / "requirements.txt")], cpu)
    (host_venv / ".edge-slm-complete").write_text("ok\n")
    log(f"venv ready in {time.monotonic() - started:.0f} s")
    return venv


def copy_project(src: Path, rev: str | None) -> None:
    """The working tree (tracked and untracked files, not ignored ones), or a commit's tree."""
    if rev:
        src.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        return
    listed = sh(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO).stdout
    for name in filter(None, listed.split("\0")):
        if name.startswith("tests/") or not (REPO / name).is_file():
            continue
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)


def install_project(root: Root, venv: Path, wheels: Path, src: Path, check: bool = True) -> str:
    """``pip install .`` of the project's fresh copy; ``check=False`` where the venv's
    onnxruntime is below the project's own requirement on purpose (the refusal test)."""
    cpu = CPU_MODELS["cortex-a76"]
    pip = [f"{venv}/bin/pip", "install", "-q", "--no-index", "--find-links", str(wheels)]
    root.check([*pip, "--no-deps", "--force-reinstall", str(src)], cpu)
    if check:
        root.check([f"{venv}/bin/pip", "check"], cpu)
    versions = root.check(
        [
            f"{venv}/bin/python",
            "-c",
            "import platform, sys, onnxruntime, tokenizers, numpy; print(platform.python_version(), "
            "platform.machine(), onnxruntime.__version__, tokenizers.__version__, numpy.__version__)",
        ],
        cpu,
    ).stdout.split()
    return "python {} ({}), onnxruntime {}, tokenizers {}, numpy {}".format(*versions)


# ---------------------------------------------------------------- the fleet (on the host)


@dataclass(frozen=True)
class Case:
    """One signed release sideloaded onto the device, and what the device must do with it."""

    label: str
    version: str
    expect_active: bool
    with_variant: bool = False  # also publish the 4-bit variant for boards without dot-product


CASES = (
    Case("good", "1.1.0", True, with_variant=True),
    Case("golden-shifted", "1.2.0", False),
    Case("wrong-weights", "1.3.0", False),
    Case("truncated-weights", "1.4.0", False),
)
VARIANT = "int4-block32"  # what a board without dot-product takes (model_packs/hardware.py)
VARIANT_TAG = "aarch64-no-dotprod"


def _copy_pack(src: Path, dst: Path, version: str) -> dict[str, object]:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.name != "manifest.json":
            os.link(p, dst / p.name)  # packs are immutable; anything changed below is rewritten
    manifest: dict[str, object] = json.loads((src / "manifest.json").read_text())
    manifest["version"] = version
    return manifest


def _rewrite(pack: Path, manifest: dict[str, object], name: str, data: bytes) -> None:
    """Replace one file and its manifest entry, so the broken pack is still a valid, signed one."""
    target = pack / name
    target.unlink()
    target.write_bytes(data)
    files = manifest["files"]
    assert isinstance(files, dict)
    files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data)}


def _swap_same_shape_tensors(pack: Path, manifest: dict[str, object]) -> str:
    """Weights that load but are wrong: the contents of same-shaped quantized tensors swapped
    pairwise (as a build that mixed up two projections would make)."""
    import onnx  # the host venv has the build extra

    model = onnx.load(str(pack / str(manifest["model_file"])), load_external_data=False)
    by_shape: dict[tuple[int, ...], list[tuple[str, int, int]]] = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if len(t.dims) == 3 and ext.get("location") == "weights.bin":
            by_shape.setdefault(tuple(t.dims), []).append((t.name, int(ext["offset"]), int(ext["length"])))
    data = bytearray((pack / "weights.bin").read_bytes())
    swapped = 0
    for group in by_shape.values():
        for (_, a, n), (_, b, _m) in zip(group[0::2], group[1::2], strict=False):
            data[a : a + n], data[b : b + n] = data[b : b + n], data[a : a + n]
            swapped += 1
    if not swapped:
        raise SystemExit("arm64: found no same-shaped quantized tensors to swap in weights.bin")
    _rewrite(pack, manifest, "weights.bin", bytes(data))
    return f"{swapped} pairs of same-shaped weight tensors swapped"


def _shift_goldens(pack: Path, manifest: dict[str, object]) -> None:
    """Goldens this pack will not reproduce: every recorded id one up, and the recorded text
    what those ids decode to (so the tokenizer check passes and the logits rule must judge)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(pack / "tokenizer.json"))
    vocab = manifest["architecture"]["vocab_size"]  # type: ignore[index]
    for g in manifest["golden"]:  # type: ignore[attr-defined]
        g["token_ids"] = [(t + 1) % vocab for t in g["token_ids"]]
        g["text"] = tokenizer.decode(g["token_ids"], skip_special_tokens=True)


def make_release(case: Case, default_pack: Path, out: Path, suffix: str = "") -> Path:
    pack = out / f"{case.label}-{case.version}{suffix}"
    manifest = _copy_pack(default_pack, pack, case.version)
    if case.label == "golden-shifted":
        _shift_goldens(pack, manifest)
    elif case.label == "wrong-weights":
        _swap_same_shape_tensors(pack, manifest)
    elif case.label == "truncated-weights":
        data = (pack / "weights.bin").read_bytes()
        _rewrite(pack, manifest, "weights.bin", data[: len(data) // 2])
    (pack / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return pack


def build_fleet(work: Path, default_pack: Path) -> Path:
    """A fresh signed repository with every case published (versions go up in CASES order)."""
    fleet = [sys.executable, "-m", "fleet.cli"]  # edge-fleet of the host's venv
    repo, keys = work / "repo", work / "keys"
    root_secret = {**os.environ, "EDGE_FLEET_ROOT_PASSPHRASE": "arm64-harness"}  # a throwaway fleet
    sh([*fleet, "repo", "init", "--repo", str(repo), "--keys", str(keys)], env=root_secret)
    for case in CASES:
        pack = make_release(case, default_pack, work / "packs")
        sh([*fleet, "pack", "publish", str(pack), "--repo", str(repo), "--keys", str(keys)])
        if case.with_variant:
            variant = make_release(case, variant_pack(default_pack), work / "packs", f"-{VARIANT}")
            publish = [*fleet, "pack", "publish", str(variant), "--repo", str(repo), "--keys", str(keys)]
            sh([*publish, "--hardware", VARIANT_TAG])
    return repo


def variant_pack(default_pack: Path) -> Path:
    """The default pack at the variant's level, built beside it (``make test-arm64`` does)."""
    pack = default_pack.with_name(f"{default_pack.name}-{VARIANT}")
    if not (pack / "manifest.json").exists():
        raise SystemExit(
            f"arm64: no {VARIANT} pack at {pack}: run `edge-pack build --quantization {VARIANT}`"
        )
    return pack


# ---------------------------------------------------------------- one CPU model


@dataclass
class Outcome:
    name: str
    ok: bool
    detail: str


def hwcap_check(root: Root, cpu: CpuModel) -> Outcome:
    """The emulated CPU is the one asked for: dot-product present exactly on the models that have it."""
    done = root.check(["/bin/true"], cpu, env={"LD_SHOW_AUXV": "1"})
    m = re.search(r"AT_HWCAP:\s+(0x[0-9a-f]+|[0-9a-f]+)", done.stdout + done.stderr)
    if not m:
        return Outcome("hwcap", False, "no AT_HWCAP in LD_SHOW_AUXV output")
    hwcap = int(m.group(1), 16)
    has = bool(hwcap & HWCAP_ASIMDDP)
    return Outcome("hwcap", has == cpu.dotprod, f"asimddp={'yes' if has else 'no'}")


def keep_log(path: Path, argv: list[str], done: subprocess.CompletedProcess[str]) -> None:
    """Each device command's full output stays in the work directory until the next run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"$ {shlex.join(argv)}\nexit {done.returncode}\n{done.stdout}{done.stderr}")


def last_error(output: str) -> str:
    """The line that says what went wrong: a traceback's exception or the CLI's error line."""
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    said = [ln for ln in lines if re.match(r"([\w.]*(Error|Exception)\b|edge-agent: error)", ln)]
    return said[-1] if said else " | ".join(lines[-6:])


def ask(root: Root, cpu: CpuModel, venv: Path, env: dict[str, str], name: str = "ask") -> Outcome:
    argv = [f"{venv}/bin/edge-agent", "ask", ASK_QUESTION, "--max-tokens", "12", "--threads", "2"]
    started = time.monotonic()
    done = root.run(argv, cpu, env=env)
    took = time.monotonic() - started
    keep_log(root.work / cpu.qemu / f"{name.replace(' ', '-')}.log", argv, done)
    answer = " ".join(done.stdout.split())
    stats = re.search(r"completion (\d+) tokens.*decode ([0-9.]+) tokens/s", done.stderr)
    if done.returncode != 0 or not answer or not stats:
        return Outcome(name, False, f"exit {done.returncode}: {last_error(done.stdout + done.stderr)}")
    return Outcome(name, True, f"{answer!r} ({stats.group(1)} tokens, {stats.group(2)} tok/s, {took:.0f} s)")


# The aarch64 onnxruntime floor (model_packs/runtimes.py), tested at the floor itself, and the
# newest release below it, which loads the graph and fails at its first run ("Only 4b
# quantization is supported for unpacked compute"): the device must refuse it up front.
BELOW_FLOOR = "1.22.1"


def aarch64_floor() -> str:
    from model_packs.runtimes import ORT_FLOORS

    return ORT_FLOORS["aarch64"]


def floor_checks(root: Root, cpu: CpuModel, dev: Device, env: dict[str, str]) -> list[Outcome]:
    floor = aarch64_floor()
    at = ask(root, cpu, dev.floor_venvs[floor], env, name=f"ask at onnxruntime {floor}")
    argv = [f"{dev.floor_venvs[BELOW_FLOOR]}/bin/edge-agent", "ask", ASK_QUESTION, "--max-tokens", "4"]
    done = root.run(argv, cpu, env=env)
    keep_log(root.work / cpu.qemu / f"ask-at-{BELOW_FLOOR}.log", argv, done)
    said = last_error(done.stderr)
    refused = done.returncode != 0 and "[runtime_mismatch]" in done.stderr and "Traceback" not in done.stderr
    below = Outcome(f"refused at onnxruntime {BELOW_FLOOR}", refused, said)
    return [at, below]


def seed_state(state: Path, default_pack: Path) -> None:
    """The device before the update: its store seeded with the default pack (what
    ``edge-agent run`` does on an empty state directory), done on the host."""
    from agent.packs.store import PackStore
    from model_packs.format import verify_pack

    manifest = verify_pack(default_pack)
    store = PackStore(state)
    store.seed(default_pack, f"{manifest.name}@{manifest.version}")


def sideload(root: Root, cpu: CpuModel, venv: Path, repo: Path, default_pack: Path, case: Case) -> Outcome:
    name = json.loads((default_pack / "manifest.json").read_text())["name"]
    device = root.work / cpu.qemu
    config = device / "agent.yaml"
    if not config.exists():
        seed_state(device / "state", default_pack)
        config.write_text(
            f"device_id: arm64-{cpu.qemu}\nstate_dir: {device / 'state'}\npack: {{threads: 2}}\n"
            f"updates: {{trusted_root: {repo / 'metadata/1.root.json'}}}\n"
        )
    target = f"{name}@{case.version}"
    argv = [f"{venv}/bin/edge-agent", "pack", "install", "--config", str(config), "--from", str(repo)]
    started = time.monotonic()
    done = root.run([*argv, "--target", target], cpu)
    took = time.monotonic() - started
    keep_log(device / f"{case.label}.log", [*argv, "--target", target], done)
    active = done.returncode == 0 and done.stdout.startswith("active:")
    label = f"{case.label} {case.version}"
    variant = re.search(r"\(variant ([\w.-]+)\)", done.stdout)
    expected = VARIANT if case.with_variant and not cpu.dotprod else "int8-block32"
    wrong_variant = active and (variant is None or variant.group(1) != expected)
    if active:
        said = f"activated variant {variant.group(1) if variant else '?'}"
        if wrong_variant:
            said += f", expected {expected}"
    else:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if re.search(r"\[[a-z_]+\]", ln)), None)
        said = f"refused: {reason}" if reason else f"exit {done.returncode}: {last_error(done.stderr)}"
        if "Traceback" in done.stderr:  # an escaped exception is a failure even where a refusal is due
            said = f"crashed: {last_error(done.stderr)}"
    ok = active == case.expect_active and not wrong_variant and "Traceback" not in done.stderr
    return Outcome(label, ok, f"{said} ({took:.0f} s)")


def first_probe(root: Root, cpu: CpuModel, venv: Path, case: Case) -> Outcome:
    """What the daemon does at its next start: the pack on trial runs its first health probe
    (the same rule as the gate) and is confirmed, or rolled back."""
    config = root.work / cpu.qemu / "agent.yaml"
    argv = [f"{venv}/bin/edge-agent", "pack", "probe", "--config", str(config)]
    started = time.monotonic()
    done = root.run(argv, cpu)
    keep_log(root.work / cpu.qemu / f"{case.label}-probe.log", argv, done)
    said = done.stdout.strip() or last_error(done.stderr)
    ok = done.returncode == 0 and done.stdout.startswith("confirmed:")
    return Outcome(
        f"{case.label} {case.version} first probe", ok, f"{said} ({time.monotonic() - started:.0f} s)"
    )


# ---------------------------------------------------------------- driver


@dataclass(frozen=True)
class Device:
    """The prepared emulated board: root, venv with the project installed, what was installed."""

    root: Root
    venv: Path
    cache: Path
    installed: str
    setup_s: float  # time spent on the cached parts (root, wheels, venv)
    floor_venvs: dict[str, Path] = field(default_factory=dict)  # onnxruntime version -> venv


def hold_lock(base: Path) -> None:
    """One run at a time per cache: a second one waits (it would wipe the first one's work)."""
    base.mkdir(parents=True, exist_ok=True)
    fd = os.open(base / ".lock", os.O_CREAT | os.O_RDWR)  # held until this process exits
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another arm64 run holds {base / '.lock'}; waiting for it to end")
        fcntl.flock(fd, fcntl.LOCK_EX)


def prepare(rev: str | None = None, onnxruntime: str | None = None, floors: tuple[str, ...] = ()) -> Device:
    """Everything up to a device install of a fresh copy of the project; with ``floors``, one
    more install for each of those onnxruntime versions (the runtime floor, and below it)."""
    if os.geteuid() != 0:
        raise SystemExit("arm64: needs root (binfmt_misc, chroot, mounts)")
    started = time.monotonic()
    cache = Path(os.environ.get("EDGE_SLM_CACHE", Path.home() / ".cache/edge-slm")).resolve()
    base = cache / "arm64"
    hold_lock(base)
    work = base / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ensure_binfmt()
    root = Root(ensure_rootfs(base), work)
    src = work / "src"
    copy_project(src, rev)
    sets = [ensure_wheels(base, *device_requirements(src, v)) for v in (onnxruntime, *floors)]
    root.binds = [*((w, True) for w, _ in sets), (cache / "packs", True)]
    venvs = [ensure_venv(root, w, key) for w, key in sets]
    prune(base, {root.path, *(w for w, _ in sets)}, root.path / "opt/edge-slm", {v.name for v in venvs})
    setup = time.monotonic() - started
    installed = install_project(root, venvs[0], sets[0][0], src)
    log(f"device install: {installed}")
    for (w, _), v, version in zip(sets[1:], venvs[1:], floors, strict=True):
        installed_at = install_project(root, v, w, src, check=version != BELOW_FLOOR)
        log(f"device install at onnxruntime {version}: {installed_at}")
    return Device(root, venvs[0], cache, installed, setup, dict(zip(floors, venvs[1:], strict=True)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="append", choices=sorted(CPU_MODELS), help="CPU model (default: all)")
    p.add_argument("--onnxruntime", help="install this onnxruntime version instead of pyproject's range")
    p.add_argument("--rev", help="install this commit of the project instead of the working tree")
    p.add_argument("--only", choices=["ask", "sideload"], help="run one part only")
    p.add_argument(
        "--case", action="append", choices=[c.label for c in CASES], help="sideload these releases only"
    )
    args = p.parse_args(argv)
    started = time.monotonic()
    cache = Path(os.environ.get("EDGE_SLM_CACHE", Path.home() / ".cache/edge-slm")).resolve()
    default_pack = cache / "packs/smollm2-135m-instruct-1.0.0"
    if not (default_pack / "manifest.json").exists():
        raise SystemExit(f"arm64: no default pack at {default_pack}: run `make pack`")
    floors = () if args.only or args.onnxruntime else (aarch64_floor(), BELOW_FLOOR)
    dev = prepare(args.rev, args.onnxruntime, floors)
    root, venv = dev.root, dev.venv
    env = {"EDGE_SLM_CACHE": str(cache)}
    cases = [c for c in CASES if not args.case or c.label in args.case]
    repo = build_fleet(root.work, default_pack) if args.only != "ask" else None

    failed = False
    for cpu in (CPU_MODELS[c] for c in (args.cpu or sorted(CPU_MODELS))):
        log(f"{cpu.qemu} ({cpu.board})")
        outcomes = [hwcap_check(root, cpu)]
        if args.only != "sideload":
            outcomes.append(ask(root, cpu, venv, env))
            log(f"  {outcomes[-1].name}: {outcomes[-1].detail}")
        if dev.floor_venvs:
            for o in floor_checks(root, cpu, dev, env):
                outcomes.append(o)
                log(f"  {o.name}: {o.detail}")
        if repo is not None:
            for case in cases:
                outcomes.append(sideload(root, cpu, venv, repo, default_pack, case))
                log(f"  {outcomes[-1].name}: {outcomes[-1].detail}")
                if case.expect_active and outcomes[-1].ok:
                    outcomes.append(first_probe(root, cpu, venv, case))
                    log(f"  {outcomes[-1].name}: {outcomes[-1].detail}")
        bad = [o for o in outcomes if not o.ok]
        failed |= bool(bad)
        verdict = "PASS" if not bad else "FAIL (" + ", ".join(o.name for o in bad) + ")"
        print(f"arm64 {cpu.qemu} ({cpu.board}): {verdict}; logs in {root.work / cpu.qemu}")
        for o in outcomes:
            print(f"    {'ok  ' if o.ok else 'FAIL'} {o.name}: {o.detail}")
    print(
        f"arm64: {dev.installed}; setup {dev.setup_s:.0f} s, total {time.monotonic() - started:.0f} s",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
