"""The telemetry spool: every record on disk first, sent in order, deleted only once delivered.

SQLite in WAL mode with ``synchronous=FULL``: each :meth:`Spool.append` is its own committed
transaction, fsynced before it returns, so a SIGKILL or a power cut loses no record that was
appended (docs/protocol.md, telemetry). Appends happen once per metrics interval and per event,
so the fsync costs nothing that matters.

Sequence numbers are per device, from 1, never reused: the next one is kept in the same file,
in the same transaction as the record. Two marks live beside it (meta table, same transaction
discipline): ``sent_through`` (the broker PUBACKed every record up to it: :meth:`mark_sent`)
and ``acked_through`` (the fleet said it stored every record up to it: :meth:`ack`). A record
is deleted only by the fleet's ack, because a broker's PUBACK is not delivery: a mosquitto
restart loses what it acknowledged but had not yet handed to the fleet's shared subscription.
:meth:`rewind` sets ``sent_through`` back to ``acked_through`` so the unacknowledged tail goes
out again (on a new broker connection, or when acks stop coming). ``sent_max`` is the highest
seq ever handed to the broker (:meth:`offer`, before the publish): an ack above it names
records this device never sent and is refused.

Bounded: at most ``max_records`` undeleted (sent-but-unacked included) and none older than
``max_age_s``. Room is made by dropping the oldest records and appending one ``dropped`` record
whose ``from_seq``..``to_seq`` covers them (and the drop record it replaces): every sequence
number in that range that the fleet has not received when the drop record arrives is lost, and
the fleet can tell a loss from a delay.
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


# meta keys: the PUBACKed mark, the fleet's acked mark, the highest seq ever sent
SENT, ACKED, SENT_MAX = "sent_through", "acked_through", "sent_max"
# what an ack did (Spool.ack)
ADVANCED, STALE, AHEAD = "advanced", "stale", "ahead"


@dataclass(frozen=True)
class Marks:
    sent_through: int
    acked_through: int
    sent_max: int

    @property
    def outstanding(self) -> bool:
        """Records were sent and the fleet has not acknowledged them yet."""
        return self.sent_through > self.acked_through


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
        self._upgrade()

    # ------------------------------------------------------------ writing

    def append(self, kind: str, data: dict[str, Any]) -> int:
        """Store a record; returns its sequence number. Makes room first when the spool is full
        or holds records older than ``max_age_s``, sent or not (a ``dropped`` record says which
        went)."""
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
        kept = self._count()  # sent-but-unacknowledged records count: they are still on this disk
        over = kept + new + 1 - self.max_records  # +1: the drop record itself
        if over > 0:
            oldest = [r[0] for r in self._db.execute("SELECT seq FROM records ORDER BY seq LIMIT ?", (over,))]
            self._drop(oldest, "spool_full")

    def _drop_too_old(self) -> None:
        cutoff = self.clock() - self.max_age_s
        old = [r[0] for r in self._db.execute("SELECT seq FROM records WHERE ts < ? ORDER BY seq", (cutoff,))]
        if old:
            self._drop(old, "too_old")

    def _drop(self, seqs: list[int], reason: str) -> None:
        """Delete ``seqs`` (the oldest undeleted, sent or not) and every undeleted drop record,
        and append one drop record that covers them all: at most one is ever undeleted. Its
        range may span records still kept; they are sent before it (sending, and sending again
        after a rewind, is in ``seq`` order), so when the fleet reads it, every number in the
        range it lacks is lost. A deleted record the fleet had already stored is not lost: the
        fleet only marks what it lacks."""
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
        """The oldest unsent records (seq > ``sent_through``), at most ``limit`` and about
        ``max_bytes`` of JSON."""
        with self._lock:
            sent = self._meta(SENT, 0)
            rows = self._db.execute(
                "SELECT seq, ts, kind, data FROM records WHERE seq > ? ORDER BY seq LIMIT ?", (sent, limit)
            ).fetchall()
        out: list[Record] = []
        size = 0
        for seq, ts, kind, data in rows:
            size += len(data) + 64
            if out and size > max_bytes:
                break
            out.append(Record(int(seq), float(ts), str(kind), json.loads(data)))
        return out

    def offer(self, through_seq: int) -> None:
        """About to publish records up to ``through_seq``: raise ``sent_max`` first, because
        the fleet's ack of them can arrive (on another thread) before the PUBACK does and must
        not be refused as ahead. Only a new high costs a write (a resend costs none)."""
        with self._lock:
            if through_seq <= self._meta(SENT_MAX, 0):
                return
            with self._tx():
                self._raise_meta(SENT_MAX, through_seq)

    def mark_sent(self, through_seq: int, delete: bool = False) -> None:
        """The broker PUBACKed every record up to ``through_seq``: they are sent, and kept
        until the fleet's ack covers them. ``delete`` (``telemetry.ack: broker``, no fleet
        to ack): the PUBACK is taken as delivery and they are deleted at once."""
        with self._lock, self._tx():
            self._raise_meta(SENT, through_seq)
            self._raise_meta(SENT_MAX, through_seq)
            if delete:
                self._delete_through(through_seq)

    def ack(self, through_seq: int) -> str:
        """The fleet stored (or accounted for) every record up to ``through_seq``: delete
        them. Returns ``advanced``; ``stale`` for an ack at or below ``acked_through`` (a
        retained ack seen again, or one overtaken): nothing changes; ``ahead`` for one above
        every seq this device has sent (a fleet store that is not this device's history, or
        a forged ack): refused, nothing deleted."""
        with self._lock, self._tx():
            if through_seq > self._meta(SENT_MAX, 0):
                return AHEAD
            if through_seq <= self._meta(ACKED, 0):
                return STALE
            self._delete_through(through_seq)
            self._raise_meta(SENT, through_seq)  # a late ack after a rewind: no need to send those again
            return ADVANCED

    def rewind(self) -> int:
        """Send again everything not acknowledged: ``sent_through`` back to ``acked_through``.
        Returns how many undeleted records that puts back in line."""
        with self._lock, self._tx():
            acked, sent = self._meta(ACKED, 0), self._meta(SENT, 0)
            self._set_meta(SENT, acked)
            row = self._db.execute(
                "SELECT COUNT(*) FROM records WHERE seq > ? AND seq <= ?", (acked, sent)
            ).fetchone()
            return int(row[0])

    def marks(self) -> Marks:
        with self._lock:
            return Marks(self._meta(SENT, 0), self._meta(ACKED, 0), self._meta(SENT_MAX, 0))

    def stats(self) -> dict[str, Any]:
        """The backlog: every undeleted record (``records``), of which ``unacked`` were sent
        and wait for the fleet's ack."""
        with self._lock:
            count, oldest = self._db.execute("SELECT COUNT(*), MIN(ts) FROM records").fetchone()
            sent = self._meta(SENT, 0)
            unacked = self._db.execute("SELECT COUNT(*) FROM records WHERE seq <= ?", (sent,)).fetchone()[0]
            return {
                "records": int(count),
                "unacked": int(unacked),
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

    def _raise_meta(self, key: str, value: int) -> None:
        """Marks only move forward (but :meth:`rewind`): a PUBACK or ack overtaken by a
        later one changes nothing."""
        if value > self._meta(key, 0):
            self._set_meta(key, value)

    def _delete_through(self, through_seq: int) -> None:
        self._db.execute("DELETE FROM records WHERE seq <= ?", (through_seq,))
        self._raise_meta(ACKED, through_seq)

    def _upgrade(self) -> None:
        """A spool written before the fleet's ack (no marks yet) deleted at the broker's
        PUBACK: everything below its oldest record was sent and is taken as acknowledged, so
        the fleet's first ack is not refused as ahead."""
        with self._tx():
            if self._db.execute("SELECT 1 FROM meta WHERE key = ?", (SENT_MAX,)).fetchone():
                return
            oldest = self._db.execute("SELECT MIN(seq) FROM records").fetchone()[0]
            done = int(oldest) - 1 if oldest is not None else self._meta("next_seq", 1) - 1
            for key in (SENT, ACKED, SENT_MAX):
                self._set_meta(key, done)

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
