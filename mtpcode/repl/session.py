"""The REPL's session buffer: the text of a session, its undo history, the window
of it the model sees, and the prompts and options built from it.

The session keeps one growing text, like a scratch file. Submitting input
appends it on a new line and the model's completion follows; ``/load``,
``/clear`` and ``/undo`` replace the text. When the text outgrows the model's
context, the model sees a *window*: the tail from a line start on, which stays
put until it no longer fits, so that consecutive prompts share their prefix
(the Engine then reuses its KV cache).

Nothing here draws on the terminal (no prompt-toolkit): the UI
(:mod:`mtpcode.repl.ui`), the commands (:mod:`mtpcode.repl.commands`) and the
suggestion engine (:mod:`mtpcode.repl.suggest`) share one :class:`SessionBuffer`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mtpcode.config import Settings
from mtpcode.generation import Done, GenerationOptions, SamplingOptions
from mtpcode.repl.edit import is_command
from mtpcode.stops import StopCondition, code_stops

if TYPE_CHECKING:
    from mtpcode.runtime import Engine

StopMode = str | int | None  # "block", a number of lines, or None (max_tokens only)

_NEWLINE = re.compile("\n")


def join_input(session: str, typed: str) -> str:
    """The session buffer after submitting ``typed``: it starts on a new line; empty input adds nothing."""
    if not typed:
        return session
    if session and not session.endswith("\n"):
        session += "\n"
    return session + typed


def count_lines(text: str) -> int:
    """Lines of ``text`` as an editor counts them (a last line without a newline counts)."""
    return text.count("\n") + (1 if text and not text.endswith("\n") else 0)


def parse_stop(text: str) -> StopMode:
    """``block`` -> "block", ``none`` -> None, ``3`` / ``3 lines`` / ``lines 3`` -> 3. ValueError otherwise."""
    words = text.lower().replace("lines", " ").replace("line", " ").split()
    if text.lower().strip() == "block":
        return "block"
    if text.lower().strip() in ("none", "off", "max_tokens"):
        return None
    if len(words) == 1 and words[0].isdigit() and int(words[0]) >= 1:
        return int(words[0])
    raise ValueError(text)


def describe_stop(stop: StopMode) -> str:
    """A stop mode in the words :func:`parse_stop` reads back."""
    if stop is None:
        return "none"
    return "block" if stop == "block" else f"{stop} line{'s' if stop != 1 else ''}"


@dataclass
class SessionTotals:
    """Sums over the completions of this session (for /stats)."""

    completions: int = 0
    generated_tokens: int = 0
    decode_s: float = 0.0
    main_forwards: int = 0
    interrupted: int = 0


class SessionBuffer:
    """The state of one REPL session that is not the terminal.

    ``engine`` is the model the session continues with (None until one is
    loaded); ``settings`` the sampling and drafting settings of completions.
    ``stop`` says where a completion ends; ``suggest_enabled`` and
    ``suggest_tokens`` drive the ghost text.

    Functions registered with :meth:`on_change` are called whenever the text
    the model sees changes other than by typing (a completion joined, a file
    loaded, the window moved, another model): whatever was computed for the old
    text (a cached suggestion) is stale then.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        *,
        stop: StopMode = "block",
        suggest: bool = True,
        suggest_tokens: int = 16,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.stop = stop
        self.suggest_enabled = suggest
        self.suggest_tokens = suggest_tokens
        self.text = ""
        self.undo_stack: list[str] = []
        self.window_start = 0  # offset into self.text where the model's view begins (long sessions)
        self.last_done: Done | None = None
        self.totals = SessionTotals()
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever the text the model sees changes other than by typing."""
        self._listeners.append(listener)

    def changed(self) -> None:
        """Tell the listeners that what they computed for the current text is stale."""
        for listener in self._listeners:
            listener()

    @property
    def lines(self) -> int:
        """Lines in the buffer."""
        return count_lines(self.text)

    # --- the text ----------------------------------------------------------------------

    def replace(self, text: str) -> None:
        """Replace the whole text (``/load``, ``/clear``); ``/undo`` brings the old one back."""
        self.undo_stack.append(self.text)
        self._set_text(text)

    def undo(self) -> bool:
        """Take back the last change (a submission with its completion, a load, a clear); False if none."""
        if not self.undo_stack:
            return False
        self._set_text(self.undo_stack.pop())
        return True

    def commit(self, joined: str, completion: str, done: Done) -> None:
        """Keep a finished completion: the buffer becomes ``joined`` (the submitted text) + ``completion``."""
        self.undo_stack.append(self.text)
        self.text = joined + completion
        self.changed()
        self.record(done)

    def record(self, done: Done) -> None:
        """Count a finished completion in the session's totals."""
        self.last_done = done
        t = self.totals
        t.completions += 1
        t.generated_tokens += done.stats.generated_tokens
        t.decode_s += done.stats.decode_s
        t.main_forwards += done.stats.main_forwards
        t.interrupted += done.stop_reason == "interrupted"

    def set_engine(self, engine: Engine) -> None:
        """Continue with another model; its window starts afresh."""
        self.engine = engine
        self.window_start = 0
        self.changed()

    def _set_text(self, text: str) -> None:
        self.text = text
        self.window_start = 0
        self.changed()

    # --- prompts -----------------------------------------------------------------------

    def joined(self, typed: str) -> str:
        """The whole buffer once ``typed`` is submitted."""
        return join_input(self.text, typed)

    def prompt_for(self, typed: str) -> str | None:
        """The text the model continues for input ``typed`` (None: nothing to continue or a command)."""
        if is_command(typed):
            return None
        joined = join_input(self.text, typed)
        if not joined.strip():
            return None
        return joined[self.window_start :]

    def fit_window(self, joined: str, count_tokens: Callable[[str], int]) -> str:
        """The tail of ``joined`` the model sees: all of it while it fits the context.

        When the session outgrows the context (less room for ``max_tokens``),
        the view jumps forward to a line start, leaving a quarter of the
        context free, and stays there, so later prompts share their prefix
        again. ``count_tokens`` must be safe to call from the current thread.
        Needs a model (:attr:`engine`).
        """
        engine = self.engine
        if engine is None:
            raise RuntimeError("fit_window needs a model")
        room = max(16, engine.n_ctx - min(self.settings.max_tokens, engine.n_ctx // 2))
        view = joined[self.window_start :]
        # Every token covers at least one byte, so short text needs no tokenizing.
        if len(view.encode("utf-8")) + 2 <= room or count_tokens(view) <= room:
            return view
        target = room * 3 // 4
        starts = [m.end() for m in _NEWLINE.finditer(joined, self.window_start) if m.end() < len(joined)]
        # The token count falls as the start moves on: find the first line start that fits.
        lo, hi = 0, len(starts)
        while lo < hi:
            mid = (lo + hi) // 2
            if count_tokens(joined[starts[mid] :]) <= target:
                hi = mid
            else:
                lo = mid + 1
        start = starts[min(lo, len(starts) - 1)] if starts else self.window_start
        self.window_start = min(start, len(self.text))
        self.changed()
        return joined[start:]

    def stops(self, prompt: str) -> list[StopCondition]:
        """Where a completion of ``prompt`` ends, by the stop mode."""
        if self.stop == "block":
            return code_stops(prompt, block=True)
        if isinstance(self.stop, int):
            return code_stops(prompt, lines=self.stop)
        return []

    def completion_options(self) -> GenerationOptions:
        """Options of a submitted completion: the session's settings."""
        return self.settings.generation_options()

    def suggestion_options(self) -> GenerationOptions:
        """Options of a ghost-text suggestion: greedy (the likeliest line), short, the session's heads."""
        return GenerationOptions(
            max_tokens=self.suggest_tokens,
            sampling=SamplingOptions(temperature=0.0),
            heads=self.settings.heads,
        )
