"""The request journal on its own: real files, a torn line, truncation."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import journal as journal_module
from agent.journal import RequestJournal
from agent.messages import ReplyTo


def test_unfinished_entries_survive_and_a_torn_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "requests.journal"
    first = RequestJournal(path)
    assert first.recover() == []
    a = first.accepted("q1", ReplyTo("edge-ops/a/r", b"\x00corr"))
    b = first.accepted("q2", ReplyTo("edge-ops/b/r", None))
    first.done(a)
    with path.open("ab") as fh:
        fh.write(b'{"op":"a","n":9,"id":"cut')  # the kill landed mid-line
    pending = RequestJournal(path).recover()  # the first one was never closed: as after SIGKILL
    assert [(p.id, p.reply) for p in pending] == [("q2", ReplyTo("edge-ops/b/r", None))]
    assert b == 2


def test_the_journal_is_truncated_when_nothing_is_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "MAX_BYTES", 2000)
    path = tmp_path / "requests.journal"
    j = RequestJournal(path)
    j.recover()
    for i in range(100):
        j.done(j.accepted(f"q{i}", ReplyTo("edge-ops/a/r", None)))
    assert path.stat().st_size < 2000  # 100 queries wrote far more: it was truncated
    j.accepted("open", ReplyTo("edge-ops/a/r", None))
    assert [p.id for p in RequestJournal(path).recover()] == ["open"]
