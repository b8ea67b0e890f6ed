"""An in-memory repository for the update rules: the fleet's real signed files, served
from a dict through the updater's fetcher interface (no HTTP server, no disk reads)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tuf.api.exceptions import DownloadHTTPError

from agent.packs.fetch import PackFetcher

BASE = "mem://fleet"


class MemoryRepository(PackFetcher):
    """``files`` maps repository paths (``metadata/1.root.json``) to bytes; tests edit it."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []

    @classmethod
    def snapshot_of(cls, repo_dir: Path) -> MemoryRepository:
        """Every file of a repository directory, read once into memory."""
        return cls({str(p.relative_to(repo_dir)): p.read_bytes() for p in repo_dir.rglob("*") if p.is_file()})

    def _get(self, url: str) -> bytes:
        self.requests.append(url)
        path = url.removeprefix(f"{BASE}/")
        if path not in self.files:
            raise DownloadHTTPError(f"{url}: not found", 404)
        return self.files[path]

    def _fetch(self, url: str) -> Iterator[bytes]:
        return iter([self._get(url)])

    def fetch_from(self, url: str, start: int) -> tuple[Iterator[bytes], bool]:
        data = self._get(url)
        return iter([data[start:]]), True
