"""Model-backed ghost text for the REPL.

All Engine work of a REPL (suggestions, completions, warm-ups, counting
tokens) goes through the engine's scheduler (mtpcode.scheduler), whose worker
thread owns the engine, as in the servers. :class:`ModelSuggest` is a
prompt-toolkit ``AutoSuggest``: the UI thread only submits a job and awaits
it, so typing never waits for the model. A suggestion whose input has changed
is cancelled as soon as the next key is typed (the scheduler's keystroke rule
does it for text typed on, the UI for any other change), and never shown.
Because the Engine reuses the KV cache of the longest common prefix, a
keystroke costs only the tokens that changed.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prompt_toolkit.auto_suggest import AutoSuggest, Suggestion

from mtpcode.scheduler import Event, Job, Outcome, Scheduler
from mtpcode.stops import StopStrings

if TYPE_CHECKING:
    from prompt_toolkit.buffer import Buffer
    from prompt_toolkit.document import Document

    from mtpcode.repl.session import SessionBuffer


_SHOWABLE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f\ufffd]*")


def showable(text: str) -> str:
    """The start of ``text`` that can be shown as ghost text and inserted as typed.

    It ends before the first control character (a tab is fine) or U+FFFD (an
    incomplete UTF-8 sequence): neither belongs in the input box.
    """
    match = _SHOWABLE.match(text)
    return match.group(0) if match else ""


@dataclass
class SuggestStats:
    """What the suggester did in this session (shown by /stats)."""

    requested: int = 0  # engine runs started
    shown: int = 0  # suggestions handed to the input box (including cache hits)
    cache_hits: int = 0  # answered from the previous suggestion without the model
    dropped: int = 0  # cancelled or stale: never shown
    errors: int = 0
    compute_s: float = 0.0  # engine time of completed suggestions
    completed: int = 0

    @property
    def mean_ms(self) -> float:
        return 1000 * self.compute_s / self.completed if self.completed else 0.0


class ModelSuggest(AutoSuggest):
    """Ghost text from the model: the rest of the current line, greedy, a few tokens.

    The ``session`` says whether to suggest (``suggest_enabled``, a model in
    ``engine``), what the model continues (``prompt_for``) and with which
    options (``suggestion_options``); the cached suggestion is dropped whenever
    the session's text changes other than by typing.
    """

    debounce_s = 0.06

    def __init__(self, session: SessionBuffer, scheduler: Callable[[], Scheduler | None]) -> None:
        self.session = session
        self.scheduler = scheduler  # the current model's scheduler (None: no model)
        self.stats = SuggestStats()
        self._cache: tuple[str, str] | None = None  # (prompt, completion up to end of line)
        self._pending: Job | None = None
        self._lock = threading.Lock()
        self.busy = False  # a suggestion is queued or running
        session.on_change(self.forget)

    # The synchronous API is not used by prompt-toolkit once the async one exists.
    def get_suggestion(self, buffer: Buffer, document: Document) -> Suggestion | None:
        return None

    def cancel_pending(self) -> None:
        """Cancel the suggestion being computed, if any (called before a completion)."""
        with self._lock:
            job, self._pending = self._pending, None
        sched = self.scheduler()
        if job is not None and sched is not None:
            sched.abandon(job, "stale")

    def forget(self) -> None:
        """Drop the cached suggestion (the session text or the model changed)."""
        self.cancel_pending()
        self._cache = None

    def from_cache(self, prompt: str) -> str | None:
        """The rest of the last suggestion if ``prompt`` typed along it; None if it does not apply."""
        cache = self._cache
        if cache is None:
            return None
        old_prompt, completion = cache
        full = old_prompt + completion
        if prompt.startswith(old_prompt) and full.startswith(prompt):
            return showable(full[len(prompt) :]) or None
        return None

    async def get_suggestion_async(self, buffer: Buffer, document: Document) -> Suggestion | None:
        sched = self.scheduler()
        if not self.session.suggest_enabled or sched is None or not document.is_cursor_at_the_end:
            return None
        prompt = self.session.prompt_for(document.text)
        if not prompt:
            return None
        cached = self.from_cache(prompt)
        if cached is not None:
            self.stats.cache_hits += 1
            self.stats.shown += 1
            return Suggestion(cached)
        # Wait for a pause in typing; if the text changed meanwhile the buffer asks again.
        await asyncio.sleep(self.debounce_s)
        if buffer.document != document:
            return None
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[Outcome] = loop.create_future()

        def end(outcome: Outcome) -> None:
            if not ended.done():
                ended.set_result(outcome)

        def on_event(event: Event) -> None:  # on the engine's worker thread
            if isinstance(event, Outcome):
                try:
                    loop.call_soon_threadsafe(end, event)
                except RuntimeError:  # the prompt was entered meanwhile and its event loop closed
                    pass

        # ``key``: the next keystroke's suggestion supersedes this one in the scheduler
        job = Job(prompt=prompt, options=self.session.suggestion_options(), stops=(StopStrings(["\n"]),),
                  key=prompt, pieces=False, sink=on_event)
        self.cancel_pending()
        with self._lock:
            self._pending = job

        def on_change(_: Any) -> None:
            sched.abandon(job, "stale")

        buffer.on_text_changed += on_change
        self._set_busy(True)
        self.stats.requested += 1
        try:
            sched.submit(job)
            outcome = await ended
        except asyncio.CancelledError:
            sched.abandon(job, "stale")  # the input box closed (submit, Ctrl-C): stop the engine run too
            raise
        finally:
            buffer.on_text_changed -= on_change
            with self._lock:
                if self._pending is job:
                    self._pending = None
            self._set_busy(False)
        if outcome.error is not None:
            self.stats.errors += 1
            return None
        if outcome.cancelled is not None or outcome.stats is None:  # superseded, or stale
            self.stats.dropped += 1
            return None
        self.stats.completed += 1
        self.stats.compute_s += outcome.stats.prefill_s + outcome.stats.decode_s
        # Kept even when the text moved on: typing along it is answered from here.
        self._cache = (prompt, outcome.text)
        if buffer.document != document:
            return None
        text = showable(outcome.text)
        if not text:
            return None
        self.stats.shown += 1
        return Suggestion(text)

    def _set_busy(self, busy: bool) -> None:
        # The toolbar shows it: redraw (we are on the UI's event loop here).
        from prompt_toolkit.application.current import get_app

        self.busy = busy
        get_app().invalidate()
