"""Errors raised while reading, verifying or building a model pack.

Every error has a stable ``code`` that CLIs print and MQTT replies carry::

    PackError                      code
    +-- ManifestError              bad_manifest      manifest missing, not JSON, wrong field
    +-- PackFileError              file_mismatch     a file is missing or differs from the manifest
    +-- RuntimeRequirementError    runtime_mismatch  onnxruntime too old, not enough RAM, ...
    +-- SourceModelError           bad_source        base model cannot be read or is unsupported
    +-- QualityGateError           quality_gate      the quantized model is too far from float
    +-- PackExistsError            pack_exists       same name and version built from other inputs
"""

from __future__ import annotations


class PackError(Exception):
    """Base of all pack errors; ``code`` is stable, the message is for people."""

    code = "pack_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ManifestError(PackError):
    code = "bad_manifest"


class PackFileError(PackError):
    code = "file_mismatch"


class RuntimeRequirementError(PackError):
    code = "runtime_mismatch"


class SourceModelError(PackError):
    code = "bad_source"


class QualityGateError(PackError):
    code = "quality_gate"


class PackExistsError(PackError):
    code = "pack_exists"
