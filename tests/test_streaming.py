"""UTF-8-safe stream decoding and stop strings, with property-based splits."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.inference.tokenizer import StopMatcher, StreamDecoder, TextTokenizer
from tests.tiny_model import train_tokenizer

TOKENIZER = TextTokenizer(train_tokenizer().to_str())


def _stream(text: str) -> list[str]:
    dec = StreamDecoder(TOKENIZER)
    out = [dec.push(t) for t in TOKENIZER.encode(text)]
    out.append(dec.flush())
    return [d for d in out if d]


def test_multibyte_characters_are_never_split() -> None:
    text = "Temp 🌡 22 °C, 温度 ok, Température"
    ids = TOKENIZER.encode(text)
    assert len(ids) > len(text.encode("utf-8")) / 4  # byte tokens: characters span tokens
    deltas = _stream(text)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_text_streams_back_exactly(text: str) -> None:
    assert "".join(_stream(text)) == TOKENIZER.decode(TOKENIZER.encode(text))


def test_invalid_bytes_at_the_end_are_flushed_as_replacement() -> None:
    ids = TOKENIZER.encode("🌡")
    dec = StreamDecoder(TOKENIZER)
    held = [dec.push(t) for t in ids[:-1]]
    assert "".join(held) == ""  # half an emoji is held back
    assert dec.flush() == "\ufffd"


def _run_stops(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces)
    return out + m.flush(), m.stopped


@settings(max_examples=200, deadline=None)
@given(
    before=st.text(max_size=20),
    stop=st.text(min_size=1, max_size=6),
    after=st.text(max_size=10),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
)
def test_stop_found_whatever_the_delta_boundaries(
    before: str, stop: str, after: str, cuts: list[int]
) -> None:
    text = before + stop + after
    bounds = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    out, stopped = _run_stops(pieces, [stop])
    assert stopped
    assert out == text[: text.find(stop)]


def test_text_without_a_stop_is_emitted_whole() -> None:
    assert _run_stops(["ab", "c<", "/en", "d"], ["</stop>"]) == ("abc</end", False)
    assert _run_stops(["x</st"], ["</stop>"]) == ("x</st", False)


def test_earliest_of_several_stops_wins() -> None:
    assert _run_stops(["one two ", "three"], ["three", "two"]) == ("one ", True)
