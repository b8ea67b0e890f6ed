"""Fetching: bytes from a repository, nothing decided. Lengths and hashes are the caller's.

:class:`PackFetcher` is what the updater needs: python-tuf's ``FetcherInterface`` for
metadata plus a ranged read for resumable pack downloads. :class:`UrlFetcher` is the real
one (http(s):// for a fleet server, file:// for a sideload directory); tests inject an
in-memory repository through the same interface.
"""

from __future__ import annotations

import abc
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient import FetcherInterface

from model_packs.fileio import fsync_dir

CHUNK = 1 << 16


class IncompleteDownload(OSError):
    """The server closed early; the part file is kept and the next try resumes."""


class PackFetcher(FetcherInterface):
    """ngclient's fetcher plus ``fetch_from``: the bytes of ``url`` from ``start`` on."""

    @abc.abstractmethod
    def fetch_from(self, url: str, start: int) -> tuple[Iterator[bytes], bool]:
        """Chunks of ``url`` from byte ``start``; the flag says whether the source honoured
        ``start`` (False: the chunks begin at byte 0)."""


class UrlFetcher(PackFetcher):
    """urllib: http(s):// with HTTP Range, file:// for a sideload directory."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s

    def _open(self, req: urllib.request.Request) -> object:
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            raise DownloadHTTPError(f"{req.full_url}: HTTP {exc.code}", exc.code) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, FileNotFoundError):
                raise DownloadHTTPError(f"{req.full_url}: not found", 404) from None
            raise

    def _fetch(self, url: str) -> Iterator[bytes]:
        return _chunks(self._open(urllib.request.Request(url)))

    def fetch_from(self, url: str, start: int) -> tuple[Iterator[bytes], bool]:
        req = urllib.request.Request(url)
        if start and url.startswith(("http://", "https://")):
            req.add_header("Range", f"bytes={start}-")
        resp = self._open(req)
        return _chunks(resp), bool(start) and getattr(resp, "status", 200) == 206


def _chunks(resp: object) -> Iterator[bytes]:
    with resp:  # type: ignore[attr-defined]
        while chunk := resp.read(CHUNK):  # type: ignore[attr-defined]
            yield chunk


def download(
    fetcher: PackFetcher,
    url: str,
    part: Path,
    length: int,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Fetch ``url`` into ``part`` until it holds exactly ``length`` bytes, resuming from
    what ``part`` already holds; never writes past ``length``, fsyncs before returning."""
    have = part.stat().st_size if part.exists() else 0
    if have > length:
        part.unlink()
        have = 0
    if have == length:
        return
    chunks, resumed = fetcher.fetch_from(url, have)
    have = have if resumed else 0
    with part.open("ab" if resumed else "wb") as out:
        for chunk in chunks:
            take = chunk[: length - have]
            out.write(take)
            have += len(take)
            if progress:
                progress(have, length)
            if have >= length:
                break
        out.flush()
        os.fsync(out.fileno())
    fsync_dir(part.parent)  # a new part file's entry too: a power cut keeps what was fsynced
    if have < length:
        raise IncompleteDownload(f"{url}: got {have} of {length} bytes; will resume")
