"""The API's command-line client: ``edge-fleet devices | device show ID | metrics``.

stdlib urllib only (the CLI needs no HTTP package); the token comes from a file, never
from argv (where ``ps`` shows it). An API error becomes an :class:`ApiClientError` with the
API's own code, so ``edge-fleet`` prints ``error [bad_selector]: ...`` like its other errors.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleet.errors import FleetError


class ApiClientError(FleetError):
    code = "api"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ApiClient:
    def __init__(
        self, base_url: str, token_file: Path, timeout_s: float = 30.0, ca_file: Path | None = None
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ApiClientError("api", f"--api {base_url!r}: expected http://HOST:PORT or https://...")
        try:
            self.token = token_file.read_text().strip().splitlines()[0].strip()
        except (OSError, IndexError):
            raise ApiClientError("api", f"cannot read a token from {token_file}") from None
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s
        try:
            self.tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ApiClientError("api", f"--api-ca {ca_file}: {exc}") from None

    def get(self, path: str, **params: str | None) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.base_url}{path}" + (f"?{query}" if query else "")
        return self._send(urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"}))

    def post(self, path: str, body: Any = None) -> Any:
        """A JSON body (or none); the API's JSON answer."""
        data = json.dumps(body).encode() if body is not None else b""
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        return self._send(urllib.request.Request(f"{self.base_url}{path}", data, headers, method="POST"))

    def _send(self, request: urllib.request.Request) -> Any:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.tls) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ApiClientError("unreachable", f"{self.base_url}: {getattr(exc, 'reason', exc)}") from None


def _api_error(exc: urllib.error.HTTPError) -> ApiClientError:
    try:
        error = json.loads(exc.read())["error"]
        return ApiClientError(str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return ApiClientError("api", f"HTTP {exc.code}")


# ---------------------------------------------------------------- terminal tables


def when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart; an empty list prints the header alone."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def devices_table(devices: list[dict[str, Any]]) -> str:
    rows = [
        [
            d["device_id"],
            d["state"] or "unknown",
            d["pack"] or "-",
            ",".join(d["hardware"]) or "-",
            ",".join(d["tags"]) or "-",
            when(d["last_seen"]),
        ]
        for d in devices
    ]
    return table(["DEVICE", "STATE", "PACK", "HARDWARE", "TAGS", "LAST SEEN (UTC)"], rows)


def device_text(detail: dict[str, Any]) -> str:
    d = detail["device"]
    latest = detail["latest_metrics"]
    lines = [
        f"device     {d['device_id']}",
        f"state      {d['state'] or 'unknown'}",
        f"pack       {d['pack'] or '-'}",
        f"agent      {d['agent_version'] or '-'}",
        f"hardware   {', '.join(d['hardware']) or '-'}",
        f"tags       {', '.join(d['tags']) or '-'}",
        f"last seen  {when(d['last_seen'])} UTC  (max seq {d['max_seq']})",
        f"metrics    {json.dumps(latest['data'], sort_keys=True)[:400] if latest else '-'}",
    ]
    gaps = ", ".join(f"{g['from_seq']}..{g['to_seq']} {g['state']}" for g in detail["gaps"])
    lines.append(f"gaps       {gaps or 'none'}")
    for e in detail["recent_events"][:10]:
        lines.append(f"event      {when(e['ts'])}  #{e['seq']} {e['kind']} {json.dumps(e['data'])[:200]}")
    return "\n".join(lines)


def series_table(series: dict[str, Any]) -> str:
    rows = [[when(p["t"]), f"{p['value']:.6g}"] for p in series["points"]]
    return table(["TIME (UTC)", f"{series['agg'].upper()}({series['metric']})"], rows)
