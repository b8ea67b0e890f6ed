"""SemVer 2.0.0: the one rule set the fleet, the manifest check and the device share."""

from __future__ import annotations

import itertools

import pytest

from model_packs.versions import MAX_LENGTH, Version, VersionError, parse_version

VALID = [
    ("0.0.0", Version(0, 0, 0)),
    ("1.2.3", Version(1, 2, 3)),
    ("10.20.30", Version(10, 20, 30)),
    ("1.0.0-alpha", Version(1, 0, 0, ("alpha",))),
    ("1.0.0-alpha.1", Version(1, 0, 0, ("alpha", "1"))),
    ("1.0.0-0.3.7", Version(1, 0, 0, ("0", "3", "7"))),
    ("1.0.0-x.7.z.92", Version(1, 0, 0, ("x", "7", "z", "92"))),
    ("1.0.0-x-y-z.--", Version(1, 0, 0, ("x-y-z", "--"))),
    ("1.0.0-0a", Version(1, 0, 0, ("0a",))),  # alphanumeric: a leading zero is fine
    ("1.0.0+20130313144700", Version(1, 0, 0, (), ("20130313144700",))),
    ("1.0.0-beta+exp.sha.5114f85", Version(1, 0, 0, ("beta",), ("exp", "sha", "5114f85"))),
    ("1.0.0+21AF26D3----117B344092BD", Version(1, 0, 0, (), ("21AF26D3----117B344092BD",))),
    ("1.0.0+001", Version(1, 0, 0, (), ("001",))),  # build identifiers may have leading zeros
    ("99999999999999999999.0.0", Version(99999999999999999999, 0, 0)),
]

INVALID = [
    "",
    "1",
    "1.2",
    "1.2.3.4",
    "1.2.3junk",  # accepted by the old fleet and device prefix match
    "v1.2.3",
    " 1.2.3",
    "1.2.3 ",
    "1.2.3\n",  # `$` in a regex would let this through
    "01.2.3",
    "1.02.3",
    "1.2.03",
    "-1.2.3",
    "1.2.3-",
    "1.2.3+",
    "1.2.3-01",  # numeric pre-release identifier with a leading zero
    "1.2.3-alpha..1",
    "1.2.3-alpha_beta",
    "1.2.3+build..1",
    "1.2.3-+build",
    "1.2.3+build+more",
    "\uff11.2.3",  # a non-ASCII digit (fullwidth one)
    "1.2.3-é",
    "1.2.3-" + "a" * MAX_LENGTH,  # longer than any version we accept from the wire
]

# Each list is in strictly ascending precedence (the SemVer 2.0.0 text's own examples first).
ASCENDING = [
    [
        *("1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2"),
        *("1.0.0-beta.11", "1.0.0-rc.1", "1.0.0"),
    ],
    ["1.0.0", "2.0.0", "2.1.0", "2.1.1"],
    ["1.9.0", "1.10.0", "1.11.0"],  # numerically, not as text
    ["0.0.9", "0.0.10", "0.1.0", "1.0.0"],
    ["1.0.0-2", "1.0.0-10", "1.0.0-a"],  # numeric below alphanumeric, numbers numerically
    ["1.0.0-A", "1.0.0-Z", "1.0.0-a"],  # text in ASCII order
    ["1.0.0-rc.1", "1.0.0-rc.1.0"],  # a longer list with the same start is above
    ["0.9.9", "1.0.0-alpha"],  # a pre-release is still above the previous release
]


@pytest.mark.parametrize(("text", "want"), VALID)
def test_valid_versions_parse_to_their_parts(text: str, want: Version) -> None:
    got = parse_version(text)
    assert (got.major, got.minor, got.patch, got.prerelease, got.build) == (
        want.major,
        want.minor,
        want.patch,
        want.prerelease,
        want.build,
    )
    assert str(got) == text


@pytest.mark.parametrize("text", INVALID)
def test_invalid_versions_are_refused(text: str) -> None:
    with pytest.raises(VersionError, match="not SemVer") as err:
        parse_version(text)
    assert err.value.code == "bad_version"
    assert isinstance(err.value, ValueError)  # callers that only know ValueError still catch it


def test_a_non_string_is_refused() -> None:
    with pytest.raises(VersionError, match="must be a string"):
        parse_version(123)  # type: ignore[arg-type]


@pytest.mark.parametrize("chain", ASCENDING, ids=lambda c: " < ".join(c))
def test_precedence(chain: list[str]) -> None:
    versions = [parse_version(v) for v in chain]
    for low, high in itertools.pairwise(versions):
        assert low < high and high > low and low != high, f"{low} < {high}"
    assert sorted(reversed(chain), key=parse_version) == chain
    assert max(reversed(chain), key=parse_version) == chain[-1]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("1.0.0", "1.0.0+build.1"),
        ("1.0.0+a", "1.0.0+b"),
        ("1.0.0-rc.1+x", "1.0.0-rc.1+y.z"),
    ],
)
def test_build_metadata_is_ignored_for_precedence(a: str, b: str) -> None:
    va, vb = parse_version(a), parse_version(b)
    assert va == vb and not va < vb and not vb < va and va <= vb and va >= vb
    assert hash(va) == hash(vb)
    assert str(va) == a and str(vb) == b  # but it is kept in the text


def test_pre_release_is_below_its_release() -> None:
    assert parse_version("2.0.0-rc.9") < parse_version("2.0.0") < parse_version("2.0.1-alpha")


def test_length_bound_is_exact() -> None:
    longest = "1.2.3-" + "a" * (MAX_LENGTH - len("1.2.3-"))
    assert str(parse_version(longest)) == longest
    with pytest.raises(VersionError):
        parse_version(longest + "a")
