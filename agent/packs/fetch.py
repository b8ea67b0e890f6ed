"""Downloads: a urllib fetcher for TUF metadata and a resumable, length-capped target
download. Fetching decides nothing: lengths and hashes are checked by the caller."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from tuf.api.exceptions import DownloadHTTPError as HTTPStatusError
from tuf.ngclient import FetcherInterface

CHUNK = 1 << 16


class UrlFetcher(FetcherInterface):
    """http(s):// for a repository server, file:// for a sideload directory."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            resp = urllib.request.urlopen(url, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            raise HTTPStatusError(f"{url}: HTTP {exc.code}", exc.code) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, FileNotFoundError):
                raise HTTPStatusError(f"{url}: not found", 404) from None
            raise
        return _chunks(resp)


def _chunks(resp: object) -> Iterator[bytes]:
    with resp:  # type: ignore[attr-defined]
        while chunk := resp.read(CHUNK):  # type: ignore[attr-defined]
            yield chunk


class IncompleteDownload(OSError):
    """The server closed early; the part file is kept and the next try resumes."""


def download(
    url: str,
    part: Path,
    length: int,
    progress: Callable[[int, int], None] | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Fetch ``url`` into ``part`` until it holds exactly ``length`` bytes, resuming with
    HTTP Range from what ``part`` already holds; never reads past ``length``."""
    have = part.stat().st_size if part.exists() else 0
    if have > length:
        part.unlink()
        have = 0
    if have == length:
        return
    req = urllib.request.Request(url)
    if have and url.startswith(("http://", "https://")):
        req.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        status = getattr(resp, "status", 200)
        mode = "ab" if have and status == 206 else "wb"
        have = have if mode == "ab" else 0
        with part.open(mode) as out:
            while have < length:
                chunk = resp.read(min(CHUNK, length - have))
                if not chunk:
                    break
                out.write(chunk)
                have += len(chunk)
                if progress:
                    progress(have, length)
            out.flush()
            os.fsync(out.fileno())
    if have < length:
        raise IncompleteDownload(f"{url}: got {have} of {length} bytes; will resume")
