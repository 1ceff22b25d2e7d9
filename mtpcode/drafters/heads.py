"""The bundle's multi-token-prediction heads as a drafter.

Head k (1-based), run on the trunk row of the last evaluated token, predicts
the token k places after the pending one: draft position k-1. Greedy decoding
drafts each head's argmax; sampling draws from the head's distribution, warped
exactly like the main model's (mtpcode.sampling), and keeps it as the draft's
``q`` for the acceptance test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from mtpcode import sampling
from mtpcode.drafters.base import Draft
from mtpcode.generation import DraftSource


class HeadForwards(Protocol):
    """What the head drafter needs of the engine, for its generation's sequence (0-based heads)."""

    def feed_head(self, k: int) -> float:
        """Bring head k up to date with the sequence's trunk rows; seconds in llama.cpp."""
        ...

    def head_logits(self, k: int) -> np.ndarray:
        """Head k's logits at the sequence's last evaluated row."""
        ...

    def head_lag(self, k: int) -> int:
        """Trunk rows head k has not been fed yet."""
        ...


class HeadDrafter:
    """Drafts position k with head k+1, for k from where the draft stands up to ``room``."""

    source = DraftSource.HEADS

    def __init__(self, heads: HeadForwards, n_heads: int, warper: sampling.Warper | None = None,
                 rng: np.random.Generator | None = None) -> None:
        self.heads = heads
        self.n_heads = n_heads
        self.warper = warper
        self.rng = rng
        self.q = [warper.new_buffer() for _ in range(n_heads)] if warper is not None else []

    def begin(self, prompt: Sequence[int], suffix: Sequence[int]) -> None:
        """Feed every head the prompt's trunk rows, so that the first draft costs one row per head."""
        for k in range(self.n_heads):
            self.heads.feed_head(k)

    def propose(self, pending: int, room: int, draft: Draft) -> None:
        for k in range(draft.n, min(room, self.n_heads)):
            # a head that sat out steps catches up on many rows: not the cost of a draft
            draft.typical = draft.typical and self.heads.head_lag(k) <= self.n_heads + 1
            draft.native_s += self.heads.feed_head(k)
            logits = self.heads.head_logits(k)
            if self.warper is None or self.rng is None:
                draft.add(sampling.greedy(logits), DraftSource.HEADS)
            else:
                q = self.warper.probs(logits, self.q[k])
                draft.add(sampling.sample(q, self.rng), DraftSource.HEADS, q)

    def accept(self, tokens: Sequence[int]) -> None:
        """Nothing to keep: the heads are fed the committed rows at their next draft, and never
        see a rejected one (so they never roll back)."""
