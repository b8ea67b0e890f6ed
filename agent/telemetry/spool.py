"""The telemetry spool: every record on disk first, sent in order, deleted only once delivered.

SQLite in WAL mode with ``synchronous=FULL``: each :meth:`Spool.append` is its own committed
transaction, fsynced before it returns, so a SIGKILL or a power cut loses no record that was
appended (docs/protocol.md, telemetry). Appends happen once per metrics interval and per event,
so the fsync costs nothing that matters.

Sequence numbers are per device, from 1, never reused: the next one is kept in the same file,
in the same transaction as the record. Records leave from the oldest (:meth:`ack` after the
broker's PUBACK), so what is pending is always one contiguous run of sequence numbers.

Bounded: at most ``max_records`` pending and none older than ``max_age_s``. Room is made by
dropping the oldest pending records and appending one ``dropped`` record whose
``from_seq``..``to_seq`` covers them (and the drop record it replaces): every sequence number in
that range that the fleet has not received when the drop record arrives is lost, and the fleet
can tell a loss from a delay.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL,
                                    data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Record:
    seq: int
    ts: float
    kind: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "ts": self.ts, "kind": self.kind, "data": self.data}


class Spool:
    """One owner of ``telemetry.sqlite3``; safe to call from several threads."""

    def __init__(
        self, path: Path, max_records: int, max_age_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        if max_records < 3:
            raise ValueError("max_records must leave room for a record and a drop record")
        self.path, self.max_records, self.max_age_s, self.clock = path, max_records, max_age_s, clock
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # the stated policy: a committed record survives
        self._db.executescript(SCHEMA)

    # ------------------------------------------------------------ writing

    def append(self, kind: str, data: dict[str, Any]) -> int:
        """Store a record; returns its sequence number. Makes room first when the spool is full
        or holds records older than ``max_age_s`` (a ``dropped`` record says which went)."""
        with self._lock, self._tx():
            self._drop_too_old()
            self._make_room(1)
            return self._insert(kind, data)

    def _insert(self, kind: str, data: dict[str, Any]) -> int:
        seq = self._meta("next_seq", 1)
        body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        self._db.execute("INSERT INTO records VALUES (?, ?, ?, ?)", (seq, self.clock(), kind, body))
        self._set_meta("next_seq", seq + 1)
        return seq

    def _make_room(self, new: int) -> None:
        pending = self._count()
        over = pending + new + 1 - self.max_records  # +1: the drop record itself
        if over > 0:
            oldest = [r[0] for r in self._db.execute("SELECT seq FROM records ORDER BY seq LIMIT ?", (over,))]
            self._drop(oldest, "spool_full")

    def _drop_too_old(self) -> None:
        cutoff = self.clock() - self.max_age_s
        old = [r[0] for r in self._db.execute("SELECT seq FROM records WHERE ts < ? ORDER BY seq", (cutoff,))]
        if old:
            self._drop(old, "too_old")

    def _drop(self, seqs: list[int], reason: str) -> None:
        """Delete ``seqs`` (the oldest pending) and every pending drop record, and append one
        drop record that covers them all: at most one is ever pending. Its range may span
        records still pending; they are delivered before it (delivery is in ``seq`` order), so
        when the fleet reads it, every number in the range it lacks is lost."""
        rows = self._db.execute("SELECT seq, data FROM records WHERE kind = 'dropped'").fetchall()
        earlier = {int(seq): json.loads(data) for seq, data in rows}
        gone = set(seqs) | set(earlier)
        from_seq = min([*gone, *(int(e["from_seq"]) for e in earlier.values())])
        count = len(gone) + sum(int(e["count"]) for e in earlier.values())
        self._db.executemany("DELETE FROM records WHERE seq = ?", [(q,) for q in sorted(gone)])
        lost_data = len(set(seqs) - set(earlier))
        self._set_meta("dropped_total", self._meta("dropped_total", 0) + lost_data)
        self._insert("dropped", {"from_seq": from_seq, "to_seq": max(gone), "count": count, "reason": reason})

    # ------------------------------------------------------------ reading and delivery

    def pending(self, limit: int, max_bytes: int) -> list[Record]:
        """The oldest undelivered records, at most ``limit`` and about ``max_bytes`` of JSON."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, ts, kind, data FROM records ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        out: list[Record] = []
        size = 0
        for seq, ts, kind, data in rows:
            size += len(data) + 64
            if out and size > max_bytes:
                break
            out.append(Record(int(seq), float(ts), str(kind), json.loads(data)))
        return out

    def ack(self, through_seq: int) -> None:
        """The broker has every record up to ``through_seq``: delete them."""
        with self._lock, self._tx():
            self._db.execute("DELETE FROM records WHERE seq <= ?", (through_seq,))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            count, oldest = self._db.execute("SELECT COUNT(*), MIN(ts) FROM records").fetchone()
            return {
                "records": int(count),
                "oldest_ts": oldest,
                "dropped_total": self._meta("dropped_total", 0),
            }

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ helpers

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def _meta(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else default

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): one record and its sequence number
    are written together or not at all."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
