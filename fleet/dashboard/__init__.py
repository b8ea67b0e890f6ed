"""The fleet dashboard: one static page (HTML, ES modules, CSS) served at ``/dashboard/``.

The page holds no data: it asks for a bearer token, keeps it in the tab's sessionStorage and
reads everything through the token-checked API (``/api/v1``), so serving the shell needs no
auth and no cookie is ever set (nothing for a cross-site request to ride on). Every dashboard
response carries a strict Content-Security-Policy: scripts, styles, images and requests only
from this origin, no inline script, no framing. Nothing is fetched from anywhere else, so the
page works on a fleet network with no internet.

``install(app)`` adds ``GET /`` (a redirect), ``GET /dashboard/`` and the static files.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import FastAPI, HTTPException, Path
from fastapi.responses import RedirectResponse, Response

from fleet.errors import FleetError

PATH = "/dashboard/"
CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidate: a new release's page is never mixed with old modules
}
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


class DashboardError(FleetError):
    code = "dashboard"


def static_files() -> dict[str, tuple[bytes, str]]:
    """File name -> (content, media type), read once from the package's ``static/``."""
    found: dict[str, tuple[bytes, str]] = {}
    for entry in (resources.files(__name__) / "static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in TYPES:
            found[entry.name] = (entry.read_bytes(), TYPES[suffix])
    if "index.html" not in found:
        raise DashboardError("the dashboard's static/index.html is missing from the installed package")
    return found


def install(app: FastAPI) -> None:
    """Add the dashboard's routes to ``app`` (no auth: the page carries no data)."""
    files = static_files()

    def serve(name: str) -> Response:
        body, media_type = files[name]
        return Response(body, media_type=media_type, headers=HEADERS)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(PATH, status_code=307)

    @app.get(PATH.rstrip("/"), include_in_schema=False)
    def no_slash() -> RedirectResponse:
        return RedirectResponse(PATH, status_code=307)

    @app.get(PATH, include_in_schema=False)
    def index() -> Response:
        return serve("index.html")

    @app.get(PATH + "{name}", include_in_schema=False)
    def static(name: Annotated[str, Path(pattern=r"^[a-z][a-z0-9_-]{0,40}\.[a-z]{2,4}$")]) -> Response:
        if name not in files or name == "index.html":
            raise HTTPException(404, f"no dashboard file {name!r}")
        return serve(name)
