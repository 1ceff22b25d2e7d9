"""Model-backed ghost text for the REPL, and the one thread that talks to the Engine.

All Engine work of a REPL (suggestions, completions, model loads) runs on one
:class:`EngineThread`, so there is never more than one generation at a time.
:class:`ModelSuggest` is a prompt-toolkit ``AutoSuggest``: the UI thread only
schedules work and awaits it, so typing never waits for the model. A
suggestion whose input has changed is cancelled through the ``cancel`` event
of ``Engine.generate`` as soon as the next key is typed, and never shown.
Because the Engine reuses the KV cache of the longest common prefix, a
keystroke costs only the tokens that changed.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prompt_toolkit.auto_suggest import AutoSuggest, Suggestion

from mtpcode.errors import MtpError
from mtpcode.generation import Done
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


class EngineThread:
    """A single worker thread that owns every call into the Engine."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtpcode-engine")

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)`` behind the work already queued; returns its future."""
        return self._pool.submit(fn, *args)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine thread and wait for its result (or exception)."""
        return self.submit(fn, *args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


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

    def __init__(self, session: SessionBuffer, worker: EngineThread) -> None:
        self.session = session
        self.worker = worker
        self.stats = SuggestStats()
        self._cache: tuple[str, str] | None = None  # (prompt, completion up to end of line)
        self._pending: threading.Event | None = None
        self._lock = threading.Lock()
        self.busy = False  # an engine run for a suggestion is queued or running
        session.on_change(self.forget)

    # The synchronous API is not used by prompt-toolkit once the async one exists.
    def get_suggestion(self, buffer: Buffer, document: Document) -> Suggestion | None:
        return None

    def cancel_pending(self) -> None:
        """Cancel the suggestion being computed, if any (called before a completion)."""
        with self._lock:
            if self._pending is not None:
                self._pending.set()

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
        if not self.session.suggest_enabled or self.session.engine is None or not document.is_cursor_at_the_end:
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
        cancel = threading.Event()
        with self._lock:
            if self._pending is not None:
                self._pending.set()
            self._pending = cancel

        def on_change(_: Any) -> None:
            cancel.set()

        buffer.on_text_changed += on_change
        self._set_busy(True)
        try:
            text = await asyncio.wrap_future(self.worker.submit(self._compute, prompt, cancel))
        except asyncio.CancelledError:
            cancel.set()  # the input box closed (submit, Ctrl-C): stop the engine run too
            raise
        finally:
            buffer.on_text_changed -= on_change
            self._set_busy(False)
        if text is None or buffer.document != document:
            return None
        text = showable(text)
        if not text:
            return None
        self.stats.shown += 1
        return Suggestion(text)

    def _set_busy(self, busy: bool) -> None:
        # The toolbar shows it: redraw (we are on the UI's event loop here).
        from prompt_toolkit.application.current import get_app

        self.busy = busy
        get_app().invalidate()

    def _compute(self, prompt: str, cancel: threading.Event) -> str | None:
        """On the engine thread: the model's greedy text up to the end of the line, or None if cancelled."""
        if cancel.is_set():
            self.stats.dropped += 1
            return None
        engine = self.session.engine
        if engine is None:
            return None
        options = self.session.suggestion_options()
        self.stats.requested += 1
        start = time.perf_counter()
        done: Done | None = None
        try:
            for event in engine.generate(prompt, options, stops=(StopStrings(["\n"]),), cancel=cancel):
                if isinstance(event, Done):
                    done = event
        except MtpError:
            self.stats.errors += 1
            return None
        if done is None or done.stop_reason == "interrupted":
            self.stats.dropped += 1
            return None
        self.stats.completed += 1
        self.stats.compute_s += time.perf_counter() - start
        # Kept even when the text moved on: typing along it is answered from here.
        self._cache = (prompt, done.text)
        if cancel.is_set():
            self.stats.dropped += 1
            return None
        return done.text
