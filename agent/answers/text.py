"""Tokens of a question or an answer: whole words, numbers and unit symbols, with positions.

Why: today's picker matched substrings, so the unit ``C`` matched "rack" and "much", and
``pm2.5`` never matched because the word split at the dot. Here a word keeps a ``.`` or ``/``
between letters or digits (``pm2.5``, ``co2``, ``µg/m³``, ``m/s``), ``°C`` and ``%RH`` are one
token each, and a number is a token of its own even when glued to its unit (``1000ppm``).
Everything is lower-cased; offsets point into the original text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Order matters: thousands-separated numbers before plain ones, words last.
_TOKEN = re.compile(
    r"""
    (?P<num>(?<![\w.])[-+\u2212]?(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+(?:[.,]\d+)?))
  | (?P<sym>>=|<=|≥|≤|>|<|=|%(?:rh\b)?|°[cfk]?\b|°|℃|℉)
  | (?P<word>[a-zµμ][a-z0-9µμ³²_']*(?:[./][a-z0-9µμ³²]+)*)
    """,
    re.VERBOSE,
)

NEGATIONS = frozenset({"not", "no", "never", "nor", "none", "nothing", "without", "neither"})


@dataclass(frozen=True)
class Token:
    text: str  # lower-cased; a number's text as written ("18.9", "-18", "1,450")
    kind: str  # "word" | "num" | "sym"
    start: int  # character offsets in the original text
    end: int

    @property
    def value(self) -> float:
        """A number token's value ("1,450" -> 1450, "18,9" -> 18.9, a Unicode minus counts as "-")."""
        return parse_number(self.text)


def parse_number(text: str) -> float:
    """The value of a number as written; a comma is a decimal mark unless it groups thousands."""
    t = text.replace("\u2212", "-")
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+", t):
        return float(t.replace(",", ""))
    return float(t.replace(",", "."))


def decimals(text: str) -> int:
    """Decimal places written ("18.90" -> 2, "1,450" -> 0, "18,9" -> 1)."""
    t = text.replace("\u2212", "-")
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+", t):
        return 0
    t = t.replace(",", ".")
    return len(t.split(".")[1]) if "." in t else 0


def tokenize(text: str) -> list[Token]:
    """All tokens of ``text`` in order."""
    lowered = text.lower()
    out = []
    for m in _TOKEN.finditer(lowered):
        kind = m.lastgroup or "word"
        tok = m.group(0)
        if kind == "word":
            tok = tok.strip("'")
            if tok.endswith("'s"):
                tok = tok[:-2]
        out.append(Token(tok, kind, m.start(), m.end()))
    return out


def words(tokens: list[Token]) -> list[str]:
    return [t.text for t in tokens]


def is_negation(word: str) -> bool:
    """ "not", "no", "isn't", "doesn't" ... (a contraction ending in n't negates)."""
    return word in NEGATIONS or word.endswith("n't")


def phrase(text: str) -> tuple[str, ...]:
    """A name or alias as a token tuple ("soil_moisture" -> ("soil", "moisture"), "PM2.5" -> ("pm2.5",))."""
    return tuple(t.text for t in tokenize(text.replace("_", " ")))


def find_phrase(tokens: list[str], target: tuple[str, ...], plural: bool = True) -> list[int]:
    """Start indexes where ``target`` occurs as whole tokens; the last token may take an s/es."""
    n = len(target)
    if n == 0:
        return []
    hits = []
    for i in range(len(tokens) - n + 1):
        if tuple(tokens[i : i + n - 1]) != target[:-1]:
            continue
        last, want = tokens[i + n - 1], target[-1]
        if last == want or (plural and last in (want + "s", want + "es")):
            hits.append(i)
    return hits
