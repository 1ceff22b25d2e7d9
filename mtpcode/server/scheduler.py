"""One engine, one generation at a time: the worker thread between HTTP requests and the engine.

Editors send a request per keystroke and abandon most of them. The scheduler
keeps a queue of jobs and runs them one by one on a worker thread (llama.cpp
computes there, so the event loop stays free to accept and answer). With
``cancel_previous`` (the default) a new completion job cancels the one running
(the engine stops within a step) and drops every queued job, which then answer
at once without running. A job whose client disconnects is cancelled the same
way. Cache warm-up jobs (``n_predict`` 0) never cancel anything; any later job
cancels them.

Jobs talk to the asyncio side through an ``asyncio.Queue`` fed with
``loop.call_soon_threadsafe``: :class:`Started` when the job's turn comes,
:class:`~mtpcode.generation.Piece` events while generating (if the job wants
them), then exactly one :class:`Outcome`. Only the worker thread uses the
engine (its tokenizer included: it is not thread-safe).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mtpcode.errors import MtpError
from mtpcode.generation import CompletionEngine, Done, GenerationOptions, Piece, Stats
from mtpcode.stops import StopCondition

log = logging.getLogger("mtpcode.server")


@dataclass
class Outcome:
    """How a job ended. ``cancelled`` names why it was cut short ("superseded",
    "disconnected", "shutdown") or is None; ``error`` is set when it failed."""

    text: str = ""
    stop_reason: str = ""
    stats: Stats | None = None
    cancelled: str | None = None
    error: Exception | None = None  # an MtpError, or what the job's prepare() raised
    ran: bool = False  # False: dropped from the queue before it started


@dataclass(frozen=True)
class Started:
    """Posted when a job's turn has come and its prepare() succeeded: the generation starts."""

    plan: Any


@dataclass
class Job:
    """One generation to run. ``prompt`` is text (tokenized with BOS) or token ids.

    ``prepare``, if given, runs on the worker thread when the job's turn comes and
    returns ``(prompt, stops, plan)``: work that needs the engine's tokenizer,
    which is not thread-safe, belongs there. What it raises ends the job
    (``Outcome.error``); ``plan`` is posted in :class:`Started`.
    """

    prompt: str | Sequence[int]
    options: GenerationOptions
    stops: Sequence[StopCondition] = ()
    prepare: Callable[[], tuple[str | Sequence[int], Sequence[StopCondition], Any]] | None = None
    plan: Any = None
    supersedes: bool = True  # a completion request: cancels what runs and what waits
    pieces: bool = True  # post the text pieces as they come (for streaming), not only the Outcome
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue[Piece | Outcome | Started] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str | None = None
    finished: bool = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach the job to the event loop that reads its events."""
        self.loop = loop
        self.events = asyncio.Queue()

    def stop(self, reason: str) -> None:
        """Ask the job to end (between engine steps); the first reason given is kept."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.cancel.set()

    def _post(self, item: Piece | Outcome | Started) -> None:
        if self.loop is None or self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


@dataclass
class Counters:
    """Totals since the server started (served at /metrics)."""

    requests: int = 0
    finished: int = 0
    cancelled: int = 0  # started, then cut short
    dropped: int = 0  # never started
    errors: int = 0
    prompt_tokens: int = 0
    prompt_tokens_evaluated: int = 0
    tokens_predicted: int = 0
    prompt_seconds: float = 0.0
    predict_seconds: float = 0.0
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def add(self, stats: Stats) -> None:
        self.prompt_tokens += stats.prompt_tokens
        self.prompt_tokens_evaluated += stats.prompt_tokens_processed
        self.tokens_predicted += stats.generated_tokens
        self.prompt_seconds += stats.prefill_s
        self.predict_seconds += stats.decode_s
        for i, (d, a) in enumerate(zip(stats.drafted_tokens, stats.accepted_tokens)):
            while len(self.drafted) <= i:
                self.drafted.append(0)
                self.accepted.append(0)
            self.drafted[i] += d
            self.accepted[i] += a


class Scheduler:
    """Runs jobs on ``engine`` one at a time, on a worker thread."""

    def __init__(self, engine: CompletionEngine, *, cancel_previous: bool = True) -> None:
        self.engine = engine
        self.cancel_previous = cancel_previous
        self.counters = Counters()
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._current: Job | None = None
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="mtpcode-generate", daemon=True)
        self._worker.start()

    # -- the asyncio side --

    def submit(self, job: Job) -> None:
        """Queue ``job`` (bound to a loop); cancel older work first if it supersedes.

        A job submitted after :meth:`close` ends at once as cancelled ("shutdown").
        """
        dropped: list[Job] = []
        with self._cond:
            if self._closed:
                dropped.append(job)
                job.stop("shutdown")
            else:
                self.counters.requests += 1
                if job.supersedes and self.cancel_previous:
                    dropped.extend(self._queue)
                    self._queue.clear()
                    if self._current is not None:
                        self._current.stop("superseded")
                else:
                    # A warm-up never waits behind or cancels real work; older warm-ups are stale.
                    stale = [j for j in self._queue if not j.supersedes]
                    for j in stale:
                        self._queue.remove(j)
                    dropped.extend(stale)
                    if self._current is not None and not self._current.supersedes:
                        self._current.stop("superseded")
                self._queue.append(job)
                self._cond.notify()
        for old in dropped:
            if old is not job:
                old.stop("superseded")
            self._finish(old, Outcome(cancelled=old.cancel_reason, stop_reason="cancelled"), ran=False)

    def abandon(self, job: Job, reason: str = "disconnected") -> None:
        """The client of ``job`` went away: drop it if queued, stop it if running."""
        with self._cond:
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
        job.stop(reason)
        if queued:
            self._finish(job, Outcome(cancelled=reason, stop_reason="cancelled"), ran=False)

    @property
    def busy(self) -> bool:
        return self._current is not None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def cancel_all(self, reason: str = "shutdown") -> None:
        """Stop the running job, drop the queued ones and accept no more (does not wait)."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            if self._current is not None:
                self._current.stop(reason)
            self._cond.notify_all()
        for job in pending:
            job.stop(reason)
            self._finish(job, Outcome(cancelled=reason, stop_reason="cancelled"), ran=False)

    def close(self, timeout: float = 10.0) -> None:
        """:meth:`cancel_all`, then wait for the worker (the engine stays open; the caller closes it)."""
        self.cancel_all("shutdown")
        self._worker.join(timeout)

    # -- the worker thread --

    def _finish(self, job: Job, outcome: Outcome, ran: bool) -> None:
        with self._cond:
            if job.finished:
                return
            job.finished = True
            outcome.ran = ran
            c = self.counters
            if outcome.error is not None:
                c.errors += 1
            elif outcome.cancelled is not None:
                if ran:
                    c.cancelled += 1
                else:
                    c.dropped += 1
            else:
                c.finished += 1
            if outcome.stats is not None:
                c.add(outcome.stats)
        job._post(outcome)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._current = self._queue.popleft()
            try:
                if job.cancel.is_set():
                    self._finish(job, Outcome(cancelled=job.cancel_reason, stop_reason="cancelled"), ran=False)
                else:
                    self._finish(job, self._run(job), ran=True)
            finally:
                with self._cond:
                    self._current = None

    def _run(self, job: Job) -> Outcome:
        if job.prepare is not None:
            try:
                job.prompt, job.stops, job.plan = job.prepare()
            except Exception as exc:  # the request cannot run (e.g. too long): its client gets the error
                return Outcome(error=exc)
        job._post(Started(job.plan))
        try:
            for event in self.engine.generate(job.prompt, job.options, job.stops, cancel=job.cancel):
                if isinstance(event, Piece):
                    if event.text and job.pieces:
                        job._post(event)
                elif isinstance(event, Done):
                    cancelled = job.cancel_reason if job.cancel.is_set() else None
                    return Outcome(text=event.text, stop_reason=event.stop_reason, stats=event.stats,
                                   cancelled=cancelled)
            return Outcome(error=MtpError("internal error: generation ended without a result"))
        except MtpError as exc:
            return Outcome(error=exc)
        except Exception as exc:  # keep serving; the client gets the message, the log the traceback
            log.error("generation failed:\n%s", traceback.format_exc())
            return Outcome(error=MtpError(f"internal error: {type(exc).__name__}: {exc}"))
