"""The FastAPI application: ``create_app(store, tokens)``; OpenAPI at ``/openapi.json``.

Every error is ``{"error": {"code", "message"}}`` with a stable code: ``unauthorized`` (401,
no or unknown token), ``forbidden`` (403, a read token on an admin call), ``not_found``
(404), ``bad_parameter`` (422, a parameter FastAPI's own checks refuse) or the specific
``bad_selector``, ``bad_metric``, ``bad_since``, ``bad_step``, ``range_too_large``, ... (422);
``store_unavailable`` (503, the database does not answer: a retry may work) and
``tokens_unavailable`` (503, the token file cannot be read: every request is refused).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Annotated, Any

import structlog
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleet.api import rollouts as rollout_routes
from fleet.api.auth import Grant, TokenFile, TokenFileError
from fleet.api.params import duration, time_range
from fleet.dashboard import install as install_dashboard
from fleet.metrics import ServiceMetrics
from fleet.rollouts.store import RolloutStore
from fleet.telemetry import retention, selectors
from fleet.telemetry.errors import TelemetryError
from fleet.telemetry.queries import FleetQueries, QueryError, SeriesQuery
from fleet.telemetry.store import TelemetryStore

log = structlog.get_logger("fleet.api")
PREFIX = "/api/v1"
DEVICE_ID = r"^[A-Za-z0-9._-]{1,64}$"
SelectorParam = Annotated[str | None, Query(max_length=selectors.MAX_SELECTOR_CHARS)]
TimeParam = Annotated[str | None, Query(max_length=32)]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Auth:
    """A dependency: the request's bearer token must be known (401) and of ``role`` (403);
    an admin token may do what a read token may."""

    def __init__(self, tokens: TokenFile, role: str) -> None:
        self.tokens, self.role = tokens, role

    def __call__(self, authorization: Annotated[str | None, Header(max_length=512)] = None) -> Grant:
        scheme, _, token = (authorization or "").partition(" ")
        found = self.tokens.check(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if found is None:
            raise ApiError(401, "unauthorized", "an 'Authorization: Bearer TOKEN' header with a known token")
        if self.role == "admin" and found.role != "admin":
            raise ApiError(403, "forbidden", "this call needs an admin token")
        return found


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def create_app(store: TelemetryStore, tokens: TokenFile, metrics: ServiceMetrics | None = None) -> FastAPI:
    """The routes read through one :class:`FleetQueries`; handlers are sync (FastAPI runs
    them in its thread pool), because the store is synchronous SQLAlchemy."""
    app = FastAPI(title="edge-fleet", version="1", docs_url=None, redoc_url=None)
    queries = FleetQueries(store.engine)
    _install_errors(app)
    if metrics is not None:
        _install_metrics(app, metrics)

    reader, admin = Depends(Auth(tokens, "read")), Depends(Auth(tokens, "admin"))
    _device_routes(app, queries, reader)
    _fleet_routes(app, queries, reader)
    rollout_routes.install(app, RolloutStore(store), reader, admin)
    install_dashboard(app)

    @app.post(f"{PREFIX}/retention/prune", dependencies=[admin])
    def prune(
        raw_days: Annotated[float, Query(ge=retention.MIN_RAW_DAYS, le=3650)] = 7,
        rollup_days: Annotated[float, Query(ge=1, le=3650)] = 400,
    ) -> dict[str, Any]:
        """Delete raw metrics records older than ``raw_days`` (their hourly rollups stay) and
        rollups older than ``rollup_days``."""
        return asdict(retention.prune(store, raw_days, rollup_days))

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _device_routes(app: FastAPI, queries: FleetQueries, auth: Any) -> None:
    @app.get(f"{PREFIX}/devices", dependencies=[auth])
    def devices(
        selector: SelectorParam = None,
        limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> dict[str, Any]:
        """The registry, by selector (``hardware=X,tag=Y,pack=NAME[@VERSION],state=S``: all must hold)."""
        rows = queries.devices(selectors.parse(selector), limit, offset)
        return {"devices": [asdict(r) for r in rows], "count": len(rows)}

    @app.get(f"{PREFIX}/devices/{{device_id}}", dependencies=[auth])
    def device(device_id: Annotated[str, Path(pattern=DEVICE_ID)]) -> dict[str, Any]:
        """Registry row, latest metrics record, recent events, open and lost gaps."""
        found = queries.device(device_id)
        if found is None:
            raise ApiError(404, "not_found", f"no device {device_id!r}")
        return {
            "device": asdict(found),
            "latest_metrics": queries.latest_record(device_id, "metrics"),
            "recent_events": queries.recent_events(device_id),
            "update_events": queries.update_events(device_id),
            "gaps": queries.device_gaps(device_id),
        }

    @app.get(f"{PREFIX}/devices/{{device_id}}/series", dependencies=[auth])
    def device_series(
        device_id: Annotated[str, Path(pattern=DEVICE_ID)],
        metric: Annotated[str, Query(max_length=200)],
        since: TimeParam = None,
        until: TimeParam = None,
        step: TimeParam = None,
        agg: Annotated[str, Query(max_length=8)] = "avg",
    ) -> dict[str, Any]:
        """A numeric field of the device's metrics records (e.g. ``answers.latency_ms.p95``), bucketed."""
        start, end, size = time_range(since, until, step, time.time())
        q = SeriesQuery(metric, start, end, size, agg, devices=(device_id,))
        return {
            "metric": metric,
            "agg": agg,
            "since": start,
            "until": end,
            "step": size,
            "points": queries.series(q),
        }


def _fleet_routes(app: FastAPI, queries: FleetQueries, auth: Any) -> None:
    @app.get(f"{PREFIX}/series", dependencies=[auth])
    def fleet_series(
        metric: Annotated[str, Query(max_length=200)],
        selector: SelectorParam = None,
        since: TimeParam = None,
        until: TimeParam = None,
        step: TimeParam = None,
        agg: Annotated[str, Query(max_length=8)] = "avg",
    ) -> dict[str, Any]:
        """One metric across the selected devices, every record of every device in its bucket."""
        start, end, size = time_range(since, until, step, time.time())
        q = SeriesQuery(metric, start, end, size, agg, selector=selectors.parse(selector))
        return {
            "metric": metric,
            "agg": agg,
            "since": start,
            "until": end,
            "step": size,
            "points": queries.series(q),
        }

    @app.get(f"{PREFIX}/gaps", dependencies=[auth])
    def gaps(
        state: Annotated[str | None, Query(pattern="^(open|lost)$")] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> dict[str, Any]:
        """Missing seq ranges, fleet-wide: ``open`` (may still arrive) or ``lost`` (dropped)."""
        return {"gaps": queries.gaps(state, limit), "counts": queries.gap_counts()}

    @app.get(f"{PREFIX}/summary", dependencies=[auth])
    def summary(window: Annotated[str, Query(max_length=16)] = "24h") -> dict[str, Any]:
        """Devices by pack, state and hardware; request outcomes and the error rate over ``window``."""
        now = time.time()
        return queries.summary(now - duration(window, "window"), now)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(QueryError)
    async def query_error(request: Request, exc: QueryError) -> JSONResponse:
        return _error(422, exc.reason, exc.message)

    @app.exception_handler(selectors.SelectorError)
    async def selector_error(request: Request, exc: selectors.SelectorError) -> JSONResponse:
        return _error(422, "bad_selector", exc.message)

    @app.exception_handler(TelemetryError)
    async def telemetry_error(request: Request, exc: TelemetryError) -> JSONResponse:
        return _error(422, exc.code, exc.message)

    @app.exception_handler(TokenFileError)
    async def token_file_error(request: Request, exc: TokenFileError) -> JSONResponse:
        log.error("api_token_file", error=exc.message)  # fail closed, and say why in the log
        return _error(503, "tokens_unavailable", "the service cannot read its token file")

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def store_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("api_store_unavailable", error=str(exc).splitlines()[0][:300])
        return _error(503, "store_unavailable", "the telemetry database does not answer; try again")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, "bad_parameter", f"{where}: {first.get('msg', 'invalid')}"[:300])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))


def _install_metrics(app: FastAPI, metrics: ServiceMetrics) -> None:
    @app.middleware("http")
    async def timed(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.observe_request(
            request.method,
            getattr(route, "path", "unmatched"),
            response.status_code,
            time.perf_counter() - started,
        )
        return response

    @app.get("/metrics", include_in_schema=False)
    async def scrape() -> Response:
        body, content_type = await run_in_threadpool(metrics.render)
        return Response(body, media_type=content_type)
