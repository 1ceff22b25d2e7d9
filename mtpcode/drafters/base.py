"""The drafter interface and the draft it fills.

As in llama.cpp's ``common/speculative`` and vLLM's proposers: a drafter is
told where a generation starts (``begin``), proposes tokens after the pending
one (``propose``), and hears which tokens were committed (``accept``). The
loop that verifies the drafts lives in the caller (:mod:`mtpcode.speculative`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mtpcode.generation import DraftSource


@dataclass(frozen=True)
class Match:
    """A context match: ``tokens`` followed the last ``length`` tokens (pending one included)
    at an earlier place of the text (``where`` is "text" or "suffix")."""

    length: int
    tokens: tuple[int, ...]
    where: str


class Draft:
    """The tokens proposed after the pending token in one step, with what acceptance needs.

    Position ``i`` has a token, the source that proposed it, and the draft
    distribution ``q`` it was drawn from: an array for a sampled head draft,
    None for a deterministic draft (greedy decoding, or a copy from the
    context), which speculative sampling treats as ``q`` one-hot on the
    token. ``match`` is the context match the step's policy weighed, if any.
    Drafters that run forwards add their time in llama.cpp to ``native_s``,
    and clear ``typical`` when that time says nothing about the cost of a
    draft (a head catching up on many rows).
    One Draft is reused for every step of a generation (no allocation per step).
    """

    def __init__(self, capacity: int) -> None:
        self.tokens = np.zeros(max(capacity, 1), dtype=np.int32)
        self.n = 0
        self.sources: list[DraftSource] = []
        self.q: list[np.ndarray | None] = []
        self.match: Match | None = None
        self.native_s = 0.0
        self.typical = True

    @property
    def capacity(self) -> int:
        return len(self.tokens)

    def clear(self) -> None:
        self.n = 0
        self.sources.clear()
        self.q.clear()
        self.match = None
        self.native_s = 0.0
        self.typical = True

    def add(self, token: int, source: DraftSource, q: np.ndarray | None = None) -> None:
        """Append a token drawn from ``q`` (None: deterministic)."""
        i = self.n
        self.tokens[i] = token
        self.sources.append(source)
        self.q.append(q)
        self.n = i + 1

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens."""
        if n < self.n:
            self.n = n
            del self.sources[n:]
            del self.q[n:]

    def count(self, source: DraftSource) -> int:
        return sum(1 for s in self.sources if s is source)


class Drafter(Protocol):
    """Proposes draft tokens for one generation.

    ``begin`` gets the prompt and the text after the cursor (token ids) once
    the prompt is evaluated. ``propose`` appends at most ``room - draft.n``
    tokens to ``draft``, for the positions after ``pending`` (the token the
    main model chose last, not yet evaluated), starting at position
    ``draft.n``: a drafter may carry on another's draft. ``accept`` hears the
    tokens each step committed (the pending token and the accepted drafts).
    """

    source: DraftSource

    def begin(self, prompt: Sequence[int], suffix: Sequence[int]) -> None: ...

    def propose(self, pending: int, room: int, draft: Draft) -> None: ...

    def accept(self, tokens: Sequence[int]) -> None: ...
