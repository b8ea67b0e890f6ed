"""The project's build backend: setuptools', with its scratch folders outside the source tree.

setuptools builds in the directory it is run from, so ``pip install .`` (the device install)
left ``build/`` and ``edge_slm_agent.egg-info/`` in the checkout, on a device in a tree that
root owns. Every hook here runs setuptools' own with both pointed at a temporary folder,
removed when the hook returns: through ``DIST_EXTRA_CONFIG``, a distutils configuration file
that setuptools reads after ``setup.cfg``. The wheel and its metadata are setuptools'
unchanged. pyproject.toml names this module (``backend-path``); pip runs each hook in a
process of its own, so the environment variable touches nothing else.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools

ConfigSettings = dict[str, Any] | None


@contextmanager
def _scratch_outside_tree() -> Iterator[None]:
    """setuptools' ``build`` and ``egg_info`` folders in a temporary folder for one hook."""
    previous = os.environ.get("DIST_EXTRA_CONFIG")
    with tempfile.TemporaryDirectory(prefix="edge-slm-build-") as tmp:
        config = Path(tmp) / "setuptools.cfg"
        # setuptools parses this file with ConfigParser's interpolation: a "%" must be doubled
        scratch = tmp.replace("%", "%%")
        config.write_text(f"[build]\nbuild_base = {scratch}/build\n[egg_info]\negg_base = {scratch}\n")
        os.environ["DIST_EXTRA_CONFIG"] = str(config)
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("DIST_EXTRA_CONFIG", None)
            else:
                os.environ["DIST_EXTRA_CONFIG"] = previous


def get_requires_for_build_wheel(config_settings: ConfigSettings = None) -> list[str]:
    with _scratch_outside_tree():
        return list(_setuptools.get_requires_for_build_wheel(config_settings))


def get_requires_for_build_sdist(config_settings: ConfigSettings = None) -> list[str]:
    with _scratch_outside_tree():
        return list(_setuptools.get_requires_for_build_sdist(config_settings))


def get_requires_for_build_editable(config_settings: ConfigSettings = None) -> list[str]:
    with _scratch_outside_tree():
        return list(_setuptools.get_requires_for_build_editable(config_settings))


def prepare_metadata_for_build_wheel(metadata_directory: str, config_settings: ConfigSettings = None) -> str:
    with _scratch_outside_tree():
        return str(_setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings))


def prepare_metadata_for_build_editable(
    metadata_directory: str, config_settings: ConfigSettings = None
) -> str:
    with _scratch_outside_tree():
        return str(_setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings))


def build_wheel(
    wheel_directory: str, config_settings: ConfigSettings = None, metadata_directory: str | None = None
) -> str:
    with _scratch_outside_tree():
        return str(_setuptools.build_wheel(wheel_directory, config_settings, metadata_directory))


def build_editable(
    wheel_directory: str, config_settings: ConfigSettings = None, metadata_directory: str | None = None
) -> str:
    with _scratch_outside_tree():
        return str(_setuptools.build_editable(wheel_directory, config_settings, metadata_directory))


def build_sdist(sdist_directory: str, config_settings: ConfigSettings = None) -> str:
    with _scratch_outside_tree():
        return str(_setuptools.build_sdist(sdist_directory, config_settings))
