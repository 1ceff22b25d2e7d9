"""A context draft that the heads carry on: the context's continuation ran out before the
heads' reach (a copied line ends, the code after it is new)."""

from __future__ import annotations

from collections.abc import Sequence

from mtpcode.drafters.base import Draft
from mtpcode.drafters.context import ContextDrafter
from mtpcode.drafters.heads import HeadDrafter
from mtpcode.generation import DraftSource


class ExtendedDrafter:
    """The context's tokens first, then heads for the positions after them, up to ``room``."""

    source = DraftSource.CONTEXT

    def __init__(self, context: ContextDrafter, heads: HeadDrafter) -> None:
        self.context = context
        self.heads = heads

    def begin(self, prompt: Sequence[int], suffix: Sequence[int]) -> None:
        """Nothing of its own: its two parts are begun as drafters in their own right."""

    def propose(self, pending: int, room: int, draft: Draft) -> None:
        self.context.propose(pending, room, draft)
        self.heads.propose(pending, room, draft)

    def accept(self, tokens: Sequence[int]) -> None:
        """Nothing of its own: its two parts hear the committed tokens as drafters in their own right."""
