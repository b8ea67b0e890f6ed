"""The rollout routes: read with a read token; start, pause, resume, abort and roll back with
an admin token (docs/fleet.md#rollouts). A person's actions only change the rollout's state
in the store; the driver holding its lease (fleet/rollouts/driver.py) acts on it at its next
tick.

Errors: ``not_found`` (404), ``bad_state`` (409: e.g. pausing a halted rollout), and 422 with
``bad_request``, ``bad_target``, ``bad_waves``, ``bad_rules``, ``bad_canary``,
``unknown_device``, ``no_devices``, ``bad_selector``, ``too_large`` (a body over 64 KiB).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from fleet.api.auth import Grant
from fleet.rollouts import states
from fleet.rollouts.errors import RolloutError
from fleet.rollouts.plan import assign_waves
from fleet.rollouts.spec import RolloutSpec
from fleet.rollouts.store import TRANSITIONS, RolloutStore
from fleet.telemetry import schema, selectors
from fleet.telemetry.queries import FleetQueries

PREFIX = "/api/v1"
ROLLOUT_ID = r"^r-[0-9a-f]{12}$"
MAX_BODY = 64 * 1024
PAGE = 5000


def install(app: FastAPI, rollouts: RolloutStore, reader: Any, admin: Any) -> None:
    """``reader``/``admin``: the app's auth dependencies (fleet/api/app.py's Auth)."""
    queries = FleetQueries(rollouts.engine)

    @app.exception_handler(RolloutError)
    async def rollout_error(request: Request, exc: RolloutError) -> JSONResponse:
        status = {"not_found": 404, "bad_state": 409}.get(exc.code, 422)
        return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=status)

    @app.get(f"{PREFIX}/rollouts", dependencies=[reader])
    def list_rollouts(limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
        """Newest first, each as ``GET /rollouts/{id}`` shows it."""
        return {"rollouts": [rollouts.view(r.rollout_id) for r in rollouts.recent(limit)]}

    @app.get(f"{PREFIX}/rollouts/{{rollout_id}}", dependencies=[reader])
    def get_rollout(rollout_id: Annotated[str, Path(pattern=ROLLOUT_ID)]) -> dict[str, Any]:
        """State, waves with counts by device state, the halt (rule, devices, figures), rules."""
        return rollouts.view(rollout_id)

    @app.get(f"{PREFIX}/rollouts/{{rollout_id}}/devices", dependencies=[reader])
    def rollout_devices(
        rollout_id: Annotated[str, Path(pattern=ROLLOUT_ID)],
        state: Annotated[str | None, Query(max_length=32)] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> dict[str, Any]:
        """The rollout's devices (wave, state, reason), optionally of one state."""
        if state is not None and state not in states.STATES:
            raise RolloutError("bad_request", f"state: one of {', '.join(states.STATES)}")
        rollouts.get(rollout_id)  # 404 for an unknown rollout, not an empty list
        rows = rollouts.devices(rollout_id, state, limit, offset)
        return {"devices": [r.public() for r in rows], "count": len(rows)}

    @app.post(f"{PREFIX}/rollouts", status_code=201)
    async def start_rollout(request: Request, grant: Grant = admin) -> dict[str, Any]:
        """``{"target", "selector", "waves", "canary", "rules"}``: the devices are chosen now."""
        body = await _json_body(request)
        return await run_in_threadpool(_start, rollouts, queries, body, grant.name)

    for action in TRANSITIONS:
        _action_route(app, rollouts, action, admin)


def _action_route(app: FastAPI, rollouts: RolloutStore, action: str, admin: Any) -> None:
    def act(rollout_id: Annotated[str, Path(pattern=ROLLOUT_ID)]) -> dict[str, Any]:
        rollouts.request(rollout_id, action, time.time())
        return rollouts.view(rollout_id)

    act.__doc__ = {
        "pause": "Stop sending; devices already instructed carry on.",
        "resume": "Carry on from a pause or a halt (a halted wave's results are then accepted).",
        "abort": "Stop for good; devices not yet instructed never are.",
        "rollback": "Send every device that took the new pack back to the pack it had.",
    }[action]
    app.post(f"{PREFIX}/rollouts/{{rollout_id}}/{action}", dependencies=[admin], name=f"rollout_{action}")(
        act
    )


async def _json_body(request: Request) -> Any:
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise RolloutError("too_large", f"the request body is over {MAX_BODY} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: nesting
        raise RolloutError("bad_request", "the body must be a JSON object") from None


def _start(rollouts: RolloutStore, queries: FleetQueries, body: Any, created_by: str) -> dict[str, Any]:
    spec = RolloutSpec.from_json(body)
    selector = selectors.parse(spec.selector)
    selected: dict[str, str | None] = {}
    offset = 0
    while True:
        page = queries.devices(selector, PAGE, offset)
        selected.update({d.device_id: d.pack for d in page})
        if len(page) < PAGE:
            break
        offset += PAGE
    packs = {**selected, **_packs(rollouts, spec.canary)}
    now = time.time()
    rollout_id = rollouts.new_id()
    waves = assign_waves(rollout_id, spec, list(selected), set(packs))
    rollouts.create(rollout_id, spec, waves, packs, created_by, now)
    return rollouts.view(rollout_id)


def _packs(rollouts: RolloutStore, devices: tuple[str, ...]) -> dict[str, str | None]:
    """The canaries known to the registry, with the pack each serves."""
    if not devices:
        return {}
    d = schema.devices.c
    query = select(d.device_id, d.pack_name, d.pack_version).where(d.device_id.in_(devices))
    with rollouts.engine.connect() as conn:
        return {
            r.device_id: f"{r.pack_name}@{r.pack_version}" if r.pack_name and r.pack_version else None
            for r in conn.execute(query)
        }
