"""``make lint`` on a fresh clone: its venv has the device install and the dev and fleet extras
only, so every other package the checked code imports must be one mypy may find missing.

A module imported from an optional extra (bench's llama_cpp, the build extra's onnx) or from no
extra at all (matplotlib) made mypy fail on a fresh clone while it passed in a venv that had it.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LINT_EXTRAS = ("dev", "fleet")  # the Makefile's DEV_STAMP, which `make lint` needs


def _name(requirement: str) -> str:
    """A distribution's name, normalized (PEP 503)."""
    return re.sub(r"[-_.]+", "-", requirement).lower()


def _lint_distributions() -> set[str]:
    """What `make lint`'s venv holds: the device install, the dev and fleet extras, and what
    they require in turn."""
    return installed_closure(LINT_EXTRAS)


def installed_closure(extras: tuple[str, ...]) -> set[str]:
    """The project's requirements with ``extras``, and what those require in turn, as names
    (read from the installed distributions' metadata: the test venv has every extra)."""
    project = PYPROJECT["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    seen: set[str] = set()
    while wanted:
        req = wanted.pop()
        name = _name(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                wanted.append(Requirement(str(sub).split(";")[0]))
    return seen


def _may_be_missing(module: str) -> bool:
    """Listed in a mypy override that lets it be missing (``ignore_missing_imports``)."""
    for override in PYPROJECT["tool"]["mypy"].get("overrides", []):
        if not override.get("ignore_missing_imports"):
            continue
        patterns = override["module"] if isinstance(override["module"], list) else [override["module"]]
        for pattern in patterns:
            if fnmatch.fnmatch(module, pattern) or (pattern.endswith(".*") and module == pattern[:-2]):
                return True
    return False


def _imported_top_level(files: list[Path]) -> dict[str, set[str]]:
    """Top-level module name -> the files importing it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_package_the_checked_code_imports_is_in_lints_venv_or_may_be_missing() -> None:
    checked = [ROOT / f for f in PYPROJECT["tool"]["mypy"]["files"]]
    files = [p for d in checked for p in (d.rglob("*.py") if d.is_dir() else [d])]
    own = {p.name for p in checked} | {f.stem for f in files if f.parent in checked}  # bench's siblings
    installed = importlib.metadata.packages_distributions()
    allowed = _lint_distributions()
    problems = []
    for module, users in sorted(_imported_top_level(files).items()):
        if module in sys.stdlib_module_names or module in own or module == "__future__":
            continue
        if _may_be_missing(module):
            continue
        dists = {_name(d) for d in installed.get(module, [])}
        if not dists & allowed:
            source = ", ".join(sorted(dists)) or "no installed distribution"
            problems.append(f"{module} (from {source}), in {sorted(users)}")
    assert not problems, (
        "make lint's venv (the device install, dev and fleet extras) lacks these: add each to one of "
        "those extras, or to mypy's ignore_missing_imports in pyproject.toml:\n" + "\n".join(problems)
    )


def test_the_check_catches_a_package_from_an_optional_extra() -> None:
    """onnx is in the build extra, which `make lint` does not install: allowed only as missing."""
    assert "onnx" not in _lint_distributions()
    assert _may_be_missing("onnx") and _may_be_missing("onnx.helper")
    assert not _may_be_missing("yaml")
