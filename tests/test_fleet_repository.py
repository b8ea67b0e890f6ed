"""The fleet's TUF repository, read by python-tuf's own ngclient over real HTTP.

ngclient is the reference reader: if it refreshes and downloads a target from the
repository as served, any TUF client does. Both layouts are checked: consistent snapshots
(the default, TUF spec 5.7.3) and the plain one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient import Updater

from fleet.errors import RepositoryError
from fleet.repository import FleetRepository
from fleet.serve import RangeHandler, make_server, serve_in_thread
from model_packs.fileio import sha256_file
from model_packs.format import file_entry
from model_packs.layout import (
    CREATED_FIELD,
    PackTarget,
    TargetError,
    consistent_path,
    pack_of_path,
    parse_target,
    target_path,
)

NAME = "tiny"


def make_pack(root: Path, version: str, payload: bytes = b"weights") -> Path:
    """A pack the format accepts (schema-valid manifest, hashed files); the files are
    stand-ins, since publishing checks hashes and never runs the model."""
    pack = root / f"{NAME}-{version}"
    pack.mkdir(parents=True)
    files = {
        "model.onnx": payload + version.encode(),
        "embed.bin": b"\x01" * 64,
        "tokenizer.json": b"{}",
        "chat_template.jinja": b"{{ messages }}",
    }
    for rel, data in files.items():
        (pack / rel).write_bytes(data)
    manifest = _manifest(version)
    manifest["files"] = {rel: vars(file_entry(pack / rel)) for rel in files}
    (pack / "manifest.json").write_text(json.dumps(manifest))
    return pack


def _manifest(version: str) -> dict[str, Any]:
    arch = dict(hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, vocab_size=16)
    return {
        "format": 1,
        "name": NAME,
        "version": version,
        "base_model": {"name": "none"},
        "license": "apache-2.0",
        "build_key": "k",
        "quantization": {"method": "int8-block32", "bits": 8, "block_size": 32, "accuracy_level": 4},
        "architecture": {**arch, "max_context": 64},
        "model_file": "model.onnx",
        "embedding": {
            "file": "embed.bin",
            **dict(rows=16, cols=8, block_size=32, codes_offset=0, scales_offset=0, zero_point=0),
        },
        "tokenizer": {
            "file": "tokenizer.json",
            "chat_template_file": "chat_template.jinja",
            "bos_token_id": None,
            "eos_token_ids": [0],
        },
        "runtime": {
            "min_ram_mb": 64,
            "onnxruntime": ">=1.20",
            "execution_providers": ["CPUExecutionProvider"],
        },
        "generation": {
            **dict(max_tokens=8, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
            **dict(context_length=64, system_prompt=""),
        },
        "evaluation": {
            **dict(heldout_tokens=10, top1_agreement=1.0, perplexity_float=2.0, perplexity_quant=2.0),
            **dict(min_top1=0.5, max_ppl_ratio=1.5),
        },
        "golden": [],
        "created": "2025-01-01T00:00:00Z",
        "builder": "test",
    }


class LoggingHandler(RangeHandler):
    """Serves the repository, records every path asked for, and can answer some paths
    with stale bytes, as a CDN cache that has not caught up would."""

    requests: ClassVar[list[str]] = []
    stale: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        LoggingHandler.requests.append(self.path)
        body = LoggingHandler.stale.get(self.path)
        if body is None:
            super().do_GET()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@dataclass
class Served:
    repo: FleetRepository
    url: str
    work: Path
    devices: list[Path] = field(default_factory=list)

    def updater(self) -> Updater:
        """A fresh ngclient reader trusting the repository's first root, as provisioned."""
        device = self.work / f"device{len(self.devices)}"
        self.devices.append(device)
        (device / "metadata").mkdir(parents=True)
        (device / "targets").mkdir()
        root = (self.repo.meta_dir / "1.root.json").read_bytes()
        return Updater(
            str(device / "metadata"),
            f"{self.url}/metadata/",
            str(device / "targets"),
            f"{self.url}/targets/",
            bootstrap=root,
        )

    def download(self, version: str) -> bytes:
        reader = self.updater()
        reader.refresh()
        info = reader.get_targetinfo(target_path(NAME, version))
        assert info is not None, f"{version} is not a signed target"
        return Path(reader.download_target(info)).read_bytes()


@pytest.fixture(params=[True, False], ids=["consistent", "plain"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init(consistent_snapshot=request.param)
    LoggingHandler.requests, LoggingHandler.stale = [], {}
    server = make_server(repo.dir, port=0, handler=LoggingHandler)
    serve_in_thread(server)
    yield Served(repo, f"http://127.0.0.1:{server.server_address[1]}", tmp_path)
    server.shutdown()
    server.server_close()


def _consistent(served: Served) -> bool:
    return bool(served.repo.root().consistent_snapshot)


# ---------------------------------------------------------------- layout


def test_init_defaults_to_consistent_snapshots(tmp_path: Path) -> None:
    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    root = repo.root()
    assert root.consistent_snapshot is True
    assert CREATED_FIELD in root.unrecognized_fields  # signed: devices check their clock against it
    names = sorted(p.name for p in repo.meta_dir.iterdir())
    assert names == [
        "1.root.json",
        "1.snapshot.json",
        "1.targets.json",
        "root.json",
        "snapshot.json",
        "targets.json",
        "timestamp.json",
    ]


def test_ngclient_downloads_a_published_pack(served: Served) -> None:
    done = served.repo.publish(make_pack(served.work / "packs", "1.0.0"))
    assert done.path == "packs/tiny/1.0.0.tar"
    assert done.file == served.repo.target_file(done.path) and sha256_file(done.file) == done.sha256
    assert served.download("1.0.0") == done.file.read_bytes()
    asked = [p for p in LoggingHandler.requests if not p.endswith(".root.json")]
    if _consistent(served):
        want_file = f"packs/tiny/{done.sha256}.1.0.0.tar"  # the hash on the basename, same directory
        assert consistent_path(done.path, done.sha256) == want_file
        want = ["/metadata/timestamp.json", "/metadata/2.snapshot.json", "/metadata/2.targets.json"]
    else:
        want_file = "packs/tiny/1.0.0.tar"
        want = ["/metadata/timestamp.json", "/metadata/snapshot.json", "/metadata/targets.json"]
    assert asked == [*want, f"/targets/{want_file}"]
    assert done.file == served.repo.targets_dir / want_file
    assert [p.name for p in done.file.parent.iterdir()] == [done.file.name]  # no temp or plain copy


def test_versioned_metadata_for_every_publish(served: Served) -> None:
    for version in ("1.0.0", "1.1.0"):
        served.repo.publish(make_pack(served.work / "packs", version))
    names = {p.name for p in served.repo.meta_dir.iterdir()}
    versioned = {f"{v}.{role}.json" for v in (1, 2, 3) for role in ("targets", "snapshot")}
    assert versioned <= names if _consistent(served) else not versioned & names
    assert not any(n.endswith(".timestamp.json") for n in names)  # the one file rewritten in place
    assert served.download("1.1.0")


def test_a_reader_behind_a_stale_cache_never_races_a_publish(served: Served) -> None:
    """The CDN still serves the timestamp from before a publish: with consistent snapshots
    every file it names is still there, so the reader finishes on the old state; without,
    it finds a snapshot that does not match (the race consistent snapshots exist for)."""
    first = served.repo.publish(make_pack(served.work / "packs", "1.0.0"))
    old_timestamp = (served.repo.meta_dir / "timestamp.json").read_bytes()
    served.repo.publish(make_pack(served.work / "packs", "1.1.0"))
    LoggingHandler.stale["/metadata/timestamp.json"] = old_timestamp
    if _consistent(served):
        assert served.download("1.0.0") == first.file.read_bytes()
        assert served.updater().get_targetinfo(target_path(NAME, "1.1.0")) is None  # not yet visible
    else:
        with pytest.raises(tuf_errors.BadVersionNumberError):
            served.download("1.0.0")


def test_republishing_the_same_pack_as_a_rollback_keeps_one_file(served: Served) -> None:
    pack = make_pack(served.work / "packs", "1.0.0")
    first = served.repo.publish(pack)
    again = served.repo.publish(pack, rollback=True)
    assert again.file == first.file and again.sha256 == first.sha256  # deterministic tar
    assert again.version == first.version + 1
    assert served.download("1.0.0") == first.file.read_bytes()


def test_key_rotation_is_followed_through_versioned_roots(served: Served) -> None:
    served.repo.publish(make_pack(served.work / "packs", "1.0.0"))
    served.repo.rotate("targets")
    served.repo.rotate("root")
    assert {"2.root.json", "3.root.json"} <= {p.name for p in served.repo.meta_dir.iterdir()}
    served.repo.publish(make_pack(served.work / "packs", "1.1.0"))
    assert served.download("1.1.0")
    assert "/metadata/3.root.json" in LoggingHandler.requests


# ---------------------------------------------------------------- republish_snapshot


def _forge_targets(repo: FleetRepository) -> int:
    """targets.json with a higher version, signed by a key the root does not list."""
    md = Metadata.from_file(str(repo.meta_dir / "targets.json"))
    md.signed.version += 1
    md.sign(CryptoSigner.generate_ed25519(), append=False)
    md.to_file(str(repo.meta_dir / "targets.json"), JSONSerializer())
    return int(md.signed.version)


def test_republish_snapshot_publishes_targets_as_signed(served: Served) -> None:
    served.repo.publish(make_pack(served.work / "packs", "1.0.0"))
    forged_version = _forge_targets(served.repo)
    snapshot_version = served.repo.republish_snapshot()
    assert snapshot_version == served.repo.load("snapshot").signed.version == 3
    listed = served.repo.load("snapshot").signed.meta["targets.json"].version
    assert listed == forged_version  # published as it is: not re-signed by the fleet
    with pytest.raises(tuf_errors.UnsignedMetadataError):
        served.download("1.0.0")
    if _consistent(served):
        assert f"/metadata/{forged_version}.targets.json" in LoggingHandler.requests


def test_republish_snapshot_without_changes_is_a_fresh_snapshot(served: Served) -> None:
    served.repo.publish(make_pack(served.work / "packs", "1.0.0"))
    before = served.repo.load("timestamp").signed.version
    served.repo.republish_snapshot()
    assert served.repo.load("timestamp").signed.version == before + 1
    assert served.download("1.0.0")


def test_a_versioned_file_is_never_rewritten(tmp_path: Path) -> None:
    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    repo.publish(make_pack(tmp_path / "packs", "1.0.0"))
    published = (repo.meta_dir / "2.targets.json").read_bytes()
    md = Metadata.from_file(str(repo.meta_dir / "targets.json"))
    md.signed.targets.clear()  # other content under the same version 2
    md.to_file(str(repo.meta_dir / "targets.json"), JSONSerializer())
    with pytest.raises(RepositoryError, match=r"2\.targets\.json is already published"):
        repo.republish_snapshot()
    assert (repo.meta_dir / "2.targets.json").read_bytes() == published


# ---------------------------------------------------------------- versions


def test_versions_only_go_up_by_semver_precedence(tmp_path: Path) -> None:
    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    packs = tmp_path / "packs"
    for version in ("1.9.0", "1.10.0-rc.1", "1.10.0"):  # 1.10 is above 1.9 (numbers, not text)
        repo.publish(make_pack(packs, version))
    for lower in ("1.10.0-rc.2", "1.10.0+rebuild", "1.9.9"):  # pre-release, same precedence, lower
        with pytest.raises(RepositoryError, match="versions only go up"):
            repo.publish(make_pack(packs, lower))
    assert sorted(repo.published_versions(NAME)) == ["1.10.0", "1.10.0-rc.1", "1.9.0"]


def test_a_pack_failing_its_quality_gate_is_not_published(tmp_path: Path) -> None:
    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    pack = make_pack(tmp_path / "packs", "1.0.0")
    manifest = json.loads((pack / "manifest.json").read_text())
    manifest["evaluation"]["top1_agreement"] = 0.1
    (pack / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RepositoryError, match="quality gate"):
        repo.publish(pack)
    assert repo.published_versions(NAME) == [] and not (repo.targets_dir / "packs").exists()


def test_target_file_of_an_unknown_target(tmp_path: Path) -> None:
    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    with pytest.raises(RepositoryError, match="not a published target"):
        repo.target_file("packs/tiny/1.0.0.tar")


# ---------------------------------------------------------------- layout rules


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("tiny@1.0.0", PackTarget("tiny", "1.0.0", "packs/tiny/1.0.0.tar")),
        (
            "smollm2-135m.q8_0@2.1.0-rc.1+b7",
            PackTarget("smollm2-135m.q8_0", "2.1.0-rc.1+b7", "packs/smollm2-135m.q8_0/2.1.0-rc.1+b7.tar"),
        ),
    ],
)
def test_parse_target(text: str, want: PackTarget) -> None:
    got = parse_target(text)
    name, version, path = got  # unpacks as the device's old (name, version, path) tuple
    assert got == want and path == target_path(name, version)
    assert pack_of_path(path) == (name, version)


@pytest.mark.parametrize(
    "text",
    [
        *("tiny", "tiny@", "@1.0.0", "Tiny@1.0.0", "-tiny@1.0.0", "ti/ny@1.0.0", "tiny@1.0"),
        *("tiny@1.0.0junk", "tiny@1.0.0@2", "a" * 65 + "@1.0.0", "tiny\n@1.0.0"),
    ],
)
def test_parse_target_refuses(text: str) -> None:
    with pytest.raises(TargetError) as err:
        parse_target(text)
    assert err.value.code == "bad_target"


@pytest.mark.parametrize(
    "path", ["packs/tiny/1.0.0.zip", "packs/tiny.tar", "other/tiny/1.0.0.tar", "packs/a/b/c.tar"]
)
def test_pack_of_path_ignores_other_targets(path: str) -> None:
    assert pack_of_path(path) is None


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/metadata/blob.bin", {"Range": "bytes=10-5"}, 416),  # never 206 with a negative length
        ("/metadata/blob.bin", {"Range": "bytes=100-"}, 416),  # starts past the end
        ("/metadata/blob.bin", {"Range": "bytes=2-4"}, 206),
        ("/metadata/", {}, 404),  # no directory listings
    ],
)
def test_serve_answers_ranges_and_directories_strictly(
    tmp_path: Path, path: str, headers: dict[str, str], status: int
) -> None:
    import urllib.error
    import urllib.request

    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "blob.bin").write_bytes(b"0123456789" * 5)
    server = make_server(tmp_path, port=0)
    serve_in_thread(server)
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}{path}", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                got, body = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            got, body = exc.code, b""
        assert got == status
        if status == 206:
            assert body == b"234"
    finally:
        server.shutdown()
