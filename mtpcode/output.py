"""Accepted tokens to text: incremental detokenization with the stop conditions applied."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence

from mtpcode.stops import StopCondition, StopReason


class TextOutput:
    """Turns accepted tokens into the text pieces a stream shows, applying stop conditions.

    Token bytes go through an incremental UTF-8 decoder, so a character split
    over byte-fallback tokens appears once all its bytes are there. Text a
    stop condition may still cut (its ``holdback``) is not shown until it is
    safe, so that the pieces shown always add up to a prefix of the final text.
    """

    __slots__ = ("_decoder", "_stops", "_token_bytes", "cut", "shown", "stop_reason", "text")

    def __init__(self, token_bytes: Callable[[int], bytes], stops: Sequence[StopCondition]) -> None:
        self._token_bytes = token_bytes
        self._stops = tuple(stops)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.shown = 0  # characters of text already emitted
        self.stop_reason: StopReason | None = None
        self.cut: int | None = None

    def push(self, tokens: Sequence[int], final: bool = False) -> str:
        """Add tokens; return the newly showable text ("" if none). Sets stop_reason on a stop."""
        if len(tokens) == 1 and not final:  # a decoding step's one token: no join
            added = self._decoder.decode(self._token_bytes(tokens[0]))
        else:
            added = self._decoder.decode(b"".join(self._token_bytes(t) for t in tokens), final)
        if not self._stops:  # nothing can cut or hold text back: all of it shows
            self.text += added
            self.shown = len(self.text)
            return added
        self.text += added
        end = len(self.text)
        for stop in self._stops:
            cut = stop.check(self.text)
            if cut is not None and (self.cut is None or cut < self.cut):
                self.cut, self.stop_reason = cut, stop.reason
        if self.cut is not None:
            end = max(self.cut, self.shown)
        elif not final and self._stops:
            hold = max(stop.holdback(self.text) for stop in self._stops)
            end = max(len(self.text) - hold, self.shown)
        piece = self.text[self.shown:end]
        self.shown = end
        return piece

    @property
    def final_text(self) -> str:
        return self.text[: self.cut] if self.cut is not None else self.text
