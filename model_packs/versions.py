"""Pack versions: SemVer 2.0.0 parsing and precedence, the one rule set of the project.

The fleet (which versions it may publish), the manifest check (which versions a pack may
carry) and the device (which update goes up) must accept exactly the same strings and
order them the same way: a version one side accepts and the other refuses is a pack that
can be published but never installed. So there is this one definition, written from the
SemVer 2.0.0 text (https://semver.org/spec/v2.0.0.html), small enough for the device.

- ``MAJOR.MINOR.PATCH``, ASCII digits, no leading zeros; optional ``-PRERELEASE`` and
  ``+BUILD``: dot-separated identifiers of ``[0-9A-Za-z-]``, none empty, numeric
  pre-release identifiers without leading zeros. Nothing before or after (no ``v``
  prefix, no trailing newline or junk).
- Precedence: numbers compare numerically; a pre-release is below its release; pre-release
  identifiers compare one by one (numeric below alphanumeric, numbers numerically, text in
  ASCII order, a shorter list below a longer one with the same start). Build metadata is
  ignored, so ``1.0.0+a == 1.0.0+b``: neither is above the other.

Callers map :class:`VersionError` to their own codes (``bad_manifest``, ``bad_target``,
``repository``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

MAX_LENGTH = 256  # versions arrive in MQTT instructions: bound the work on untrusted text

_NUMBER = r"0|[1-9][0-9]*"
_PRE_ID = rf"(?:{_NUMBER}|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
_BUILD_ID = r"[0-9A-Za-z-]+"
_SEMVER = re.compile(
    rf"(?P<major>{_NUMBER})\.(?P<minor>{_NUMBER})\.(?P<patch>{_NUMBER})"
    rf"(?:-(?P<pre>{_PRE_ID}(?:\.{_PRE_ID})*))?"
    rf"(?:\+(?P<build>{_BUILD_ID}(?:\.{_BUILD_ID})*))?",
    re.ASCII,
)

# One pre-release identifier as a sort key: numeric ones (0, n, "") sort below
# alphanumeric ones (1, 0, text), which is the SemVer rule 11.4.3.
_IdKey = tuple[int, int, str]


class VersionError(ValueError):
    """A string that is not a SemVer 2.0.0 version; ``code`` is stable."""

    code = "bad_version"


@total_ordering
@dataclass(frozen=True, eq=False)
class Version:
    """A parsed version; compares by SemVer precedence (build metadata ignored)."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(self.prerelease)
        if self.build:
            text += "+" + ".".join(self.build)
        return text

    @property
    def precedence(self) -> tuple[int, int, int, int, tuple[_IdKey, ...]]:
        """The sort key: a release (flag 1) sorts above any of its pre-releases (flag 0)."""
        release = 0 if self.prerelease else 1
        return self.major, self.minor, self.patch, release, tuple(map(_id_key, self.prerelease))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.precedence == other.precedence

    def __lt__(self, other: Version) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.precedence < other.precedence

    def __hash__(self) -> int:
        return hash(self.precedence)


def _id_key(identifier: str) -> _IdKey:
    return (0, int(identifier), "") if identifier.isdigit() else (1, 0, identifier)


def parse_version(text: str) -> Version:
    """Parse ``text`` as SemVer 2.0.0 or raise :class:`VersionError` saying why.

    Usable as a sort key: ``max(versions, key=parse_version)``.
    """
    if not isinstance(text, str):
        raise VersionError(f"version must be a string, got {type(text).__name__}")
    m = _SEMVER.fullmatch(text) if len(text) <= MAX_LENGTH else None
    if m is None:
        raise VersionError(f"version {text[:MAX_LENGTH]!r} is not SemVer (MAJOR.MINOR.PATCH[-PRE][+BUILD])")
    pre, build = m.group("pre"), m.group("build")
    return Version(
        int(m.group("major")),
        int(m.group("minor")),
        int(m.group("patch")),
        tuple(pre.split(".")) if pre else (),
        tuple(build.split(".")) if build else (),
    )
