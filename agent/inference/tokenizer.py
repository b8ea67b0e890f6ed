"""Tokenizer wrapper, UTF-8-safe stream decoding and stop strings across tokens.

Byte-level BPE splits one multi-byte character over several tokens; decoding token by
token would emit half characters. :class:`StreamDecoder` decodes a short window of ids
and only emits text once it no longer ends in a replacement character (the incremental
scheme text-generation-inference uses), so every delta is whole UTF-8.
"""

from __future__ import annotations

import threading

from tokenizers import Tokenizer


class TextTokenizer:
    """One ``tokenizers`` instance: a second one, for message content that must read
    "<|im_start|>" as plain characters, cost about 16 MB resident (measured on the default
    pack's 49k BPE vocabulary). The special-token switch is flipped around content instead, under
    a lock (prompts are built on several threads), and always set back."""

    def __init__(self, tokenizer_json: str) -> None:
        self._tok = Tokenizer.from_str(tokenizer_json)
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Encode rendered chat text; special tokens written in it are recognised."""
        with self._lock:
            return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_parts(self, parts: list[tuple[str, bool]]) -> list[int]:
        """Encode rendered chat text piece by piece: the template's own text with special
        tokens recognised, message content (``True``) with none."""
        ids: list[int] = []
        with self._lock:
            for text, is_content in parts:
                if text:
                    self._tok.encode_special_tokens = is_content
                    try:
                        ids.extend(self._tok.encode(text, add_special_tokens=False).ids)
                    finally:
                        self._tok.encode_special_tokens = False
        return ids

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))


class StreamDecoder:
    """Turns a growing list of token ids into text deltas that are never half a character."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (invalid bytes become U+FFFD)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Holds back text that could be the start of a stop string, across any deltas."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Return the text that is safe to emit now; sets ``stopped`` on a match."""
        if self.stopped:
            return ""
        text = self._pending + delta
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return text[: min(hits)]
        keep = self._held_suffix(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return "" if self.stopped else out
