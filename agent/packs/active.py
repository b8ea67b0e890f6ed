"""The one owner of the pack that serves: its engine, the serving gate, and every swap.

Everything that changes which engine answers goes through :class:`ActivePack`: seeding an
empty store, counting boots of a pack on trial (a crash loop rolls back), the first probe
after a switch, confirm or rollback, the room a health gate needs, adopting the engine the
gate already loaded, reload, and the pack info that status reports. Swaps are serialized
by one lock and never run on the dispatcher thread; the answering worker only ever sees an
engine through :meth:`serving`, which waits while a swap has paused serving.

A swap loads each pack at most once: the health gate's shadow engine becomes the serving
engine after the switch, so the new pack is not loaded a second time, and the old pack is
loaded again only when it had to be unloaded for room and the new one failed.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

from agent.config import PackConfig
from agent.errors import AgentError, ModelUnavailable, Timeout
from agent.inference import Engine, load_pack
from agent.inference.pack import available_ram_mb
from agent.packs.health import (
    HealthBudget,
    HealthStats,
    baseline,
    check_budget,
    judged,
    probe,
    release_memory,
    rss_mb,
)
from agent.packs.store import PackStore
from agent.packs.verify import UpdateRejected
from model_packs.errors import PackError
from model_packs.format import default_pack_path, verify_pack

log = structlog.get_logger("edge_agent.pack")
CRASH_LOOP_BOOTS = 3

# (pack directory, hash its files?) -> a serving engine; raises PackError or AgentError
EngineFactory = Callable[[Path, bool], Engine]


def engine_factory(cfg: PackConfig) -> EngineFactory:
    """How a pack directory becomes a serving engine under this config."""

    def open_engine(path: Path, hash_files: bool) -> Engine:
        pack = load_pack(path, hash_files=hash_files)
        return Engine(pack, threads=cfg.threads, context_length=cfg.context_length)

    return open_engine


@dataclasses.dataclass
class _Candidate:
    engine: Engine
    rss_growth_mb: float


class ActivePack:
    def __init__(
        self,
        store: PackStore,
        open_engine: EngineFactory,
        seed_from: str | None = None,
        ram_budget_mb: int | None = None,
        budget: HealthBudget | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self._open = open_engine
        self._seed_from = seed_from
        self._ram_budget_mb = ram_budget_mb
        self.budget = budget or HealthBudget()
        self._on_change = on_change or (lambda: None)
        self._engine: Engine | None = None
        self._info: dict[str, str] | None = None
        self._load_rss_mb = 0.0
        self._error: str | None = None
        self._state = "online"
        self._cond = threading.Condition()  # guards engine, paused and in_use
        self._paused = False
        self._in_use = 0
        self._swap = threading.RLock()  # one swap at a time: boot, reload, update, rollback
        self._candidate: _Candidate | None = None

    # ------------------------------------------------------------ what others read

    @property
    def state(self) -> str:
        """``online``, ``updating`` (an install runs, the old pack serves) or ``paused``."""
        return self._state

    @property
    def error(self) -> str | None:
        return self._error

    def info(self) -> dict[str, str] | None:
        return self._info

    def label(self) -> str:
        info = self._info
        return f"{info['name']} {info['version']}" if info else "no pack"

    def store_report(self) -> dict[str, Any]:
        st = self.store.state()
        return {
            "active": st.versions.get(st.active or ""),
            "previous": st.versions.get(st.previous or ""),
            "trial": st.trial,
            "last_update": st.last_outcome or None,
        }

    @contextmanager
    def serving(self, deadline: float | None = None) -> Iterator[Engine]:
        """The engine for one query. Waits while a swap has paused serving (queued requests
        wait, none is dropped) but not past ``deadline``."""
        with self._cond:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._cond.wait_for(lambda: not self._paused, left):
                raise Timeout("the deadline passed while serving was paused for a pack swap")
            engine = self._engine
            if engine is None:
                raise ModelUnavailable(f"no model pack is loaded: {self._error}")
            self._in_use += 1
        try:
            yield engine
        finally:
            with self._cond:
                self._in_use -= 1
                self._cond.notify_all()

    # ------------------------------------------------------------ boot and reload

    def boot(self) -> None:
        """Seed an empty store, count boots of a pack on trial, serve the active slot."""
        with self._swap:
            try:
                self._seed_if_empty()
            except PackError as exc:
                self._error = f"[{exc.code}] {exc.message}"
                log.error("store_seed_failed", reason=self._error)
                return
            st = self.store.note_boot()
            if st.trial and st.trial_boots > CRASH_LOOP_BOOTS:
                self.store.rollback(f"crash loop: {st.trial_boots} starts without a passing health probe")
            self._serve_slot()

    def _seed_if_empty(self) -> None:
        """An empty state directory is seeded from the configured (or default) pack, verified."""
        if self.store.active_path() is not None:
            return
        source = Path(self._seed_from) if self._seed_from else default_pack_path()
        manifest = verify_pack(source)
        self.store.seed(source, f"{manifest.name}@{manifest.version}")
        log.info("store_seeded", pack=str(source), version=manifest.version)

    def reload(self, open_engine: EngineFactory | None = None) -> dict[str, Any]:
        """Load the active slot again (with a new engine factory when the config changed);
        the old engine answers until the new one is ready, and keeps answering on failure."""
        with self._swap:
            before = self.label()
            self._open = open_engine or self._open
            path = self.store.active_path()
            try:
                if path is None:
                    raise ModelUnavailable("no pack in the store")
                engine, grew = self._load(path)
            except (PackError, AgentError) as exc:
                reason = f"[{exc.code}] {exc.message}"
                still = f", still serving {before}" if self._engine is not None else ""
                raise ModelUnavailable(f"reload failed{still}: {reason}") from None
            self._install(engine, grew)
            return {"reloaded": True, "pack": self.info(), "previous": before}

    # ------------------------------------------------------------ updates

    @contextmanager
    def updating(self) -> Iterator[None]:
        """Hold the swap lock for a whole install and report ``updating``; whatever happens
        inside, serving resumes on exit (on the old pack if the new one never took over)."""
        with self._swap:
            self._set_state("updating")
            try:
                yield
            finally:
                self._drop_candidate()
                if self._paused:
                    self._serve_slot()
                    self._resume()
                self._set_state("online")

    def gate(self, staged: Path, need_mb: int) -> dict[str, float]:
        """Health gate of a staged pack: load it once in a shadow engine (pausing serving
        when both do not fit), replay its goldens, compare latency and memory with the
        active pack measured just before. On success the shadow engine is kept for
        :meth:`promote`; raises :class:`UpdateRejected` otherwise."""
        baseline = self._baseline()
        paused = not self._fits(need_mb)
        if paused:
            self._pause_and_unload(need_mb)
        try:
            engine, grew = self._load_shadow(staged)
            stats = judged(engine, self.budget, grew)
            check_budget(stats, baseline, self.budget)
        except UpdateRejected:
            if paused:
                self._serve_slot()  # the old pack, unloaded for room: loaded again, once
                self._resume()
            raise
        self._candidate = _Candidate(engine, grew)
        return {**stats.as_dict(), "paused_serving": float(paused)}

    def promote(self, slot: Path) -> str | None:
        """After the store switched to ``slot``: serve the gate's engine (no second load),
        after the first health probe; a failing probe rolls back. Returns the failure."""
        cand, self._candidate = self._candidate, None
        if cand is None:
            return self._serve_slot()
        cand.engine.pack = dataclasses.replace(cand.engine.pack, path=slot)  # renamed, same files
        failure = probe(cand.engine, self.budget)
        if failure is None:
            self.store.confirm()
            self._install(cand.engine, cand.rss_growth_mb)
            self._resume()
            return None
        del cand
        release_memory()
        if self.store.rollback(failure):
            log.warning("pack_rolled_back", reason=failure, to=self.store.active_version())
        if self._engine is None:
            self._serve_slot()
        self._resume()
        return failure

    # ------------------------------------------------------------ internals

    def _load(self, path: Path, hash_files: bool = True) -> tuple[Engine, float]:
        before = rss_mb()
        engine = self._open(path, hash_files)
        grew = max(0.0, rss_mb() - before)
        m = engine.pack.manifest
        log.info("pack_loaded", pack=str(path), name=m.name, version=m.version, threads=engine.threads)
        return engine, grew

    def _load_shadow(self, staged: Path) -> tuple[Engine, float]:
        try:
            # staging was hashed as it was unpacked: no second pass over the files
            return self._load(staged, hash_files=False)
        except Exception as exc:  # any load failure is the pack's, reported as such
            raise UpdateRejected("health_gate", f"pack does not load: {exc}") from None

    def _install(self, engine: Engine, rss_growth_mb: float) -> None:
        """Make ``engine`` the serving one; the old one finishes its query and is released."""
        with self._cond:
            old, self._engine = self._engine, engine
            m = engine.pack.manifest
            self._info = {"name": m.name, "version": m.version}
            self._load_rss_mb, self._error = rss_growth_mb, None
            self._cond.notify_all()
        del old
        release_memory()
        self._on_change()

    def _serve_slot(self) -> str | None:
        """Load the active slot; a pack on trial must pass its first probe, else the store
        rolls back and the previous pack serves. Returns the failure, if any."""
        error, engine, grew = self._try_load_active()
        if engine is not None and self.store.state().trial:
            error = probe(engine, self.budget)
            if error is None:
                self.store.confirm()
            else:
                engine = None
        if (
            engine is None
            and self.store.state().trial
            and self.store.rollback(error or "failed after activation")
        ):
            log.warning("pack_rolled_back", reason=error, to=self.store.active_version())
            _, engine, grew = self._try_load_active()
        if engine is None:
            self._error = error
            return error
        self._install(engine, grew)
        return error

    def _try_load_active(self) -> tuple[str | None, Engine | None, float]:
        path = self.store.active_path()
        if path is None:
            return self._error or "no pack in the store", None, 0.0
        try:
            engine, grew = self._load(path)
        except (PackError, AgentError) as exc:
            log.error("pack_load_failed", pack=str(path), reason=exc.message)
            return f"[{exc.code}] {exc.message}", None, 0.0
        return None, engine, grew

    def _baseline(self) -> HealthStats | None:
        """The active pack's latency measured now on the serving engine (no second load)
        and the RSS its load added; None when nothing serves."""
        try:
            with self.serving() as engine:
                return baseline(engine, self.budget, self._load_rss_mb)
        except (ModelUnavailable, UpdateRejected):
            return None  # the active pack itself misbehaves: do not hold the new one to it

    def _fits(self, need_mb: int) -> bool:
        engine = self._engine
        if engine is None:
            return True
        active_mb = engine.pack.manifest.runtime.min_ram_mb
        free = available_ram_mb() if self._ram_budget_mb is None else self._ram_budget_mb - active_mb
        return free is None or need_mb <= free

    def _pause_and_unload(self, need_mb: int) -> None:
        log.warning("pausing_for_swap", need_mb=need_mb, ram_budget_mb=self._ram_budget_mb)
        with self._cond:
            self._paused = True
            self._cond.wait_for(lambda: self._in_use == 0)  # the running query finishes first
            old, self._engine = self._engine, None
        del old
        release_memory()
        self._set_state("paused")

    def _resume(self) -> None:
        with self._cond:
            was, self._paused = self._paused, False
            self._cond.notify_all()
        if was:
            self._set_state("updating")

    def _drop_candidate(self) -> None:
        if self._candidate is not None:
            self._candidate = None
            release_memory()

    def _set_state(self, state: str) -> None:
        self._state = state
        self._on_change()
