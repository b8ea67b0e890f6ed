"""Durable writes and file hashing on real files."""

from __future__ import annotations

import hashlib
import os
import stat
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_packs.fileio import CHUNK, atomic_write_bytes, atomic_writer, fsync_dir, sha256_file


@pytest.fixture()
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "state.json"  # parents are created
    atomic_write_bytes(path, b"first")
    assert path.read_bytes() == b"first"
    atomic_write_bytes(path, b"second, longer")
    assert path.read_bytes() == b"second, longer"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]  # no temp file left


def test_a_reader_keeps_the_file_it_opened(tmp_path: Path) -> None:
    """The new content is a new inode renamed into place: an open reader is not torn."""
    path = tmp_path / "meta.json"
    atomic_write_bytes(path, b"old" * 1000)
    with path.open("rb") as reader:
        atomic_write_bytes(path, b"new")
        assert reader.read() == b"old" * 1000
    assert path.read_bytes() == b"new"


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "pack.tar"
    atomic_write_bytes(path, b"complete")
    with pytest.raises(RuntimeError, match="disk gone"), atomic_writer(path) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("disk gone")
    assert path.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["pack.tar"]


def test_a_failed_first_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "new.bin"
    with pytest.raises(KeyboardInterrupt), atomic_writer(path) as fh:
        fh.write(b"x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_streamed_writes_arrive_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    parts = [bytes([i]) * 70_000 for i in range(20)]
    with atomic_writer(path) as fh:
        for part in parts:
            fh.write(part)
        assert not path.exists()  # nothing visible until the writer is done
    assert path.read_bytes() == b"".join(parts)


def test_mode_is_what_a_plain_open_gives(tmp_path: Path, umask_022: None) -> None:
    """Served files must be readable by a web server: not the 0600 of mkstemp."""
    atomic_write_bytes(tmp_path / "atomic", b"x")
    (tmp_path / "plain").write_bytes(b"x")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"atomic": 0o644, "plain": 0o644}


def test_fsync_dir(tmp_path: Path) -> None:
    fsync_dir(tmp_path)  # a real directory: no error
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "file")


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 7, 3 * CHUNK])
def test_sha256_file_matches_hashlib(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_sha256_file_memory_stays_flat(tmp_path: Path) -> None:
    path = tmp_path / "large"
    with path.open("wb") as fh:
        for _ in range(16):
            fh.write(os.urandom(CHUNK))
    tracemalloc.start()
    try:
        sha256_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * CHUNK, f"hashing a {16 * CHUNK} byte file peaked at {peak} bytes"


def test_sha256_file_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "missing")
