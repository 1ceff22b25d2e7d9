"""One worker thread between the front ends and the engine: a queue, the slots, continuous batching.

Every front end that serves requests over time (the HTTP server, the stdio
server, the REPL) submits :class:`Job` objects here. The worker thread owns the
engine (llama.cpp computes there, and the tokenizer is not thread-safe). Each
iteration it starts what the queue lets start on the free slots, then runs one
:meth:`~mtpcode.runtime.Engine.step` for every running request together: one
forward carries one request's verify rows beside another's plain row and a
third's prompt chunk. A job reports through its ``sink`` (called on the worker
thread): :class:`Started` when it gets its slot, the text pieces if it wants
them, then exactly one :class:`Outcome`.

**Slots.** A job naming a slot (llama-server's ``id_slot``) waits for that slot;
otherwise it takes the free slot whose cached prompt is most like its own
(the share of the longer of the two that is a common prefix, at least half),
else the free slot used least recently, as llama-server picks them. When no
slot is free, or the free KV cells are too few for it, it waits in the queue.

**Cancelling.** A job ends early only for its own reasons: its client went away
(:meth:`Scheduler.abandon`), the server shuts down, or - with ``supersede`` -
the same client sent its next keystroke. A keystroke is recognised by its
text: a new job whose ``key`` (the text before the cursor) continues a queued
or running job's by at most :data:`KEYSTROKE_CHARS` characters, or is that
text less at most as many (typing, a backspace; after at most
:data:`WINDOW_LINES` lines dropped at either start, as editors slide their
window over the file), supersedes it (:func:`keystroke`). Another client's request,
about other text, never cuts a completion short. Background jobs (cache
warm-ups) never supersede anything.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from mtpcode.errors import MtpError, NoRoom, UsageError
from mtpcode.generation import CompletionEngine, Done, GenerationOptions, Piece, Stats
from mtpcode.stops import StopCondition, StopReason

if TYPE_CHECKING:  # (the runtime's types: importing it loads llama.cpp, which the CLI's start does not need)
    from mtpcode.slots import Slot
    from mtpcode.speculative import Generation

log = logging.getLogger("mtpcode.scheduler")
T = TypeVar("T")

# A keystroke changes the text before the cursor within this many characters of its end (a
# character, a word, a new line and its indentation; a pasted block is not a keystroke).
KEYSTROKE_CHARS = 256
# Editors send a window of lines around the cursor: moving it slides the window's start too.
WINDOW_LINES = 2
# A free slot whose cached prompt shares at least this share of the longer prompt is taken for a
# job ahead of the least recently used one.
SIMILAR_PROMPT = 0.5


@dataclass
class Outcome:
    """How a job ended. ``cancelled`` names why it was cut short (the scheduler's "superseded"
    and "shutdown", or the reason a front end gave :meth:`Scheduler.abandon` or :meth:`Job.stop`,
    such as "disconnected") or is None; ``error`` is set when it failed."""

    text: str = ""
    stop_reason: StopReason = StopReason.CANCELLED
    stats: Stats | None = None
    cancelled: str | None = None
    error: Exception | None = None  # an MtpError, or what the job's prepare() raised
    ran: bool = False  # False: dropped from the queue before it started


@dataclass(frozen=True)
class Started:
    """Posted when a job got its slot and its prepare() succeeded: the generation starts."""

    plan: Any
    slot: int


Event = Started | Piece | Outcome
Prepared = tuple[str | Sequence[int], Sequence[StopCondition], Any]


@dataclass(eq=False)
class Job:
    """One generation to run. ``prompt`` is text (tokenized with BOS) or token ids.

    ``prepare``, if given, runs on the worker thread when the job's turn comes and
    returns ``(prompt, stops, plan)``: work that needs the engine's tokenizer
    belongs there. What it raises ends the job (``Outcome.error``); ``plan`` is
    posted in :class:`Started`. ``slot``: the slot to run on (None: the
    scheduler picks). ``key``: the text the keystroke rule compares (None: the
    job neither supersedes nor is superseded; a job that supersedes a running one
    takes its slot, ``after`` it stops). ``background``: a cache warm-up,
    which supersedes nothing. ``pieces``: post text pieces, not only the end.
    ``sink`` receives the events, on the worker thread (``pieces``: every
    piece, some with no text yet, for the token count); a sink that raises
    stops its job, never the worker.
    """

    prompt: str | Sequence[int] = ""
    options: GenerationOptions = field(default_factory=GenerationOptions)
    stops: Sequence[StopCondition] = ()
    prepare: Callable[[], Prepared] | None = None
    slot: int | None = None
    key: str | Sequence[int] | None = None
    background: bool = False
    pieces: bool = True
    sink: Callable[[Event], None] | None = None
    plan: Any = None
    id: int = 0  # set by submit: the request id of the log lines
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str | None = None
    finished: bool = False
    ids: list[int] | None = None  # the prompt's tokens, once prepared
    ran_on: int = -1  # the slot it got
    after: int | None = None  # the slot of the same client's job it superseded (it holds its prompt)
    # the superseded job when it was still being started (its slot not yet chosen): ``after`` is
    # its slot once it has one
    after_job: Job | None = field(default=None, repr=False)
    label: str = ""  # who asked, for the log (a client address and path)

    def stop(self, reason: str) -> None:
        """Ask the job to end (between engine steps); the first reason given is kept."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.cancel.set()

    def post(self, event: Event) -> None:
        if self.sink is None:
            return
        try:
            self.sink(event)
        except Exception:  # (a front end's bug, or its receiver gone): this job ends, the others go on
            log.error("request %d: its events cannot be delivered; it is stopped:\n%s", self.id,
                      traceback.format_exc())
            self.sink = None
            self.stop("disconnected")


@dataclass
class Counters:
    """Totals since the scheduler started (a server's /metrics)."""

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
    drafted: int = 0
    accepted: int = 0

    def add(self, stats: Stats) -> None:
        self.prompt_tokens += stats.prompt_tokens
        self.prompt_tokens_evaluated += stats.prompt_tokens_processed
        self.tokens_predicted += stats.generated_tokens
        self.prompt_seconds += stats.prefill_s
        self.predict_seconds += stats.decode_s
        self.drafted += sum(stats.drafted_by_source.values())
        self.accepted += sum(stats.accepted_by_source.values())


@dataclass(frozen=True)
class SlotInfo:
    """What /slots shows of a slot: never its prompt."""

    id: int
    n_ctx: int
    is_processing: bool
    id_task: int  # the running request's id, -1 when idle
    n_cached: int  # tokens of its KV cache
    n_decoded: int  # tokens the running request generated so far


class SlotEngine(CompletionEngine, Protocol):
    """What the scheduler needs of an engine (mtpcode.runtime.Engine): slots, and requests
    started on them and stepped together."""

    @property
    def slots(self) -> Sequence[Slot]: ...

    def start(self, prompt: str | Sequence[int], options: GenerationOptions | None = None,
              stops: Sequence[StopCondition] = (), cancel: threading.Event | None = None, *,
              slot: int = 0) -> Generation: ...

    def step(self, gens: Sequence[Generation]) -> None: ...

    def release(self, gen: Generation) -> None: ...

    def last_used(self, slot: int) -> int: ...


def keystroke(old: str | Sequence[int], new: str | Sequence[int]) -> bool:
    """Whether ``new`` looks like the next keystroke of the client that sent ``old``: one is the
    other plus at most KEYSTROKE_CHARS at the end (typing; a backspace or the cursor moving back),
    after at most WINDOW_LINES lines dropped at either start, and what they share is at least half
    of the longer. Two clients' texts are not each other's continuation (four prompts that differ
    in their last words, typists at different places of a file)."""
    for a, b in _windows(old, new):
        common = _common_prefix(a, b)
        longer = max(len(a), len(b))
        if common == min(len(a), len(b)) and longer - common <= KEYSTROKE_CHARS and 2 * common >= longer > 0:
            return True
    return False


def _windows(old: str | Sequence[int], new: str | Sequence[int]) -> list[tuple[Any, Any]]:
    pairs: list[tuple[Any, Any]] = [(old, new)]
    if isinstance(old, str) and isinstance(new, str):
        for text, other, first in ((old, new, True), (new, old, False)):
            start = 0
            for _ in range(WINDOW_LINES):
                start = text.find("\n", start) + 1
                if start <= 0:
                    break
                pairs.append((text[start:], other) if first else (other, text[start:]))
    return pairs


def _common_prefix(a: Any, b: Any) -> int:
    n = min(len(a), len(b))
    if isinstance(a, str) and isinstance(b, str):
        lo, hi = 0, n  # binary search on C-speed slice compares
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if a[:mid] == b[:mid]:
                lo = mid
            else:
                hi = mid - 1
        return lo
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    """Runs jobs on ``engine`` (its slots, batched) on a worker thread; ``supersede``: a client's
    next keystroke cancels its running or queued job."""

    def __init__(self, engine: SlotEngine, *, supersede: bool = True) -> None:
        self.engine = engine
        self.supersede = supersede
        self.counters = Counters()
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: dict[int, tuple[Job, Generation]] = {}  # slot -> its job
        self._starting: Job | None = None  # off the queue, being prepared and started
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._next_id = 0
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="mtpcode-engine", daemon=True)
        self._worker.start()

    # -- any thread ------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue ``job``; with ``supersede``, the same client's older jobs end. A job submitted
        after :meth:`close` ends at once as cancelled ("shutdown")."""
        stale: list[Job] = []
        error: UsageError | None = None
        with self._cond:
            self._next_id += 1
            job.id = self._next_id
            if job.slot is not None and not 0 <= job.slot < len(self.engine.slots):
                error = UsageError(f"slot {job.slot} does not exist (there are {len(self.engine.slots)})")
            elif self._closed:
                job.stop("shutdown")
                stale.append(job)
            else:
                self.counters.requests += 1
                if self.supersede and job.key is not None and not job.background:
                    stale = [old for old in self._queue if old.key is not None and keystroke(old.key, job.key)]
                    for old in stale:
                        self._queue.remove(old)
                        job.after = old.after if job.after is None else job.after
                        job.after_job = job.after_job or old.after_job
                    for old in self._started():
                        if old.key is not None and keystroke(old.key, job.key):
                            old.stop("superseded")
                            job.after = old.ran_on if old.ran_on >= 0 else old.after
                            if old.ran_on < 0:  # being started: it gets a slot in a moment
                                job.after_job = old
                            log.info("request %d: superseded by request %d", old.id, job.id)
                self._queue.append(job)
                self._cond.notify()
        if error is not None:
            self._finish(job, Outcome(error=error), ran=False)
        for old in stale:
            old.stop("superseded" if old is not job else "shutdown")
            self._finish(old, Outcome(cancelled=old.cancel_reason), ran=False)

    def abandon(self, job: Job, reason: str = "disconnected") -> None:
        """The client of ``job`` went away: drop it if queued, stop it if running."""
        with self._cond:
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
        job.stop(reason)
        if queued:
            self._finish(job, Outcome(cancelled=reason), ran=False)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker thread between two steps (work that needs the engine, such as
        its tokenizer, which is not thread-safe) and return what it returns (or raise what it raises)."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise MtpError("the engine's scheduler is closed")
            self._calls.append((fn, future))
            self._cond.notify()
        return future.result()

    @property
    def busy(self) -> int:
        """Requests running."""
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def slots(self) -> list[SlotInfo]:
        running = dict(self._running)
        out = []
        for seq in self.engine.slots:
            job, gen = running.get(seq.id, (None, None))
            out.append(SlotInfo(id=seq.id, n_ctx=self.engine.n_ctx, is_processing=job is not None,
                                id_task=job.id if job is not None else -1, n_cached=seq.n_main,
                                n_decoded=gen.stats.generated_tokens if gen is not None else 0))
        return out

    def cancel_all(self, reason: str = "shutdown") -> None:
        """Stop the running jobs, drop the queued ones and accept no more (does not wait)."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            for job in self._started():
                job.stop(reason)
            self._cond.notify_all()
        for job in pending:
            job.stop(reason)
            self._finish(job, Outcome(cancelled=reason), ran=False)

    def close(self, timeout: float = 10.0) -> bool:
        """:meth:`cancel_all`, then wait for the worker. True when it has stopped; False when it is
        still inside a step after ``timeout`` (the engine stays open: close it only after True)."""
        self.cancel_all("shutdown")
        self._worker.join(timeout)
        return not self._worker.is_alive()

    def _started(self) -> list[Job]:
        """The jobs off the queue and not finished: running, or being started (under the lock)."""
        jobs = [job for job, _ in self._running.values()]
        if self._starting is not None:
            jobs.append(self._starting)
        return jobs

    # -- the worker thread -------------------------------------------------------

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
        if outcome.error is not None:
            log.info("request %d: failed: %s", job.id, outcome.error)
        elif outcome.stats is not None:
            log.info("request %d: %s: %s", job.id, outcome.cancelled or outcome.stop_reason, outcome.stats.summary())
        job.post(outcome)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._running and not self._calls and not self._closed:
                    self._cond.wait()
                if self._closed and not self._running:
                    for _, future in self._calls:
                        future.set_exception(MtpError("the engine's scheduler is closed"))
                    self._calls.clear()
                    return
                calls = list(self._calls)
                self._calls.clear()
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller's thread
                    future.set_exception(exc)
            self._admit()
            if self._running:
                self._step()

    def _admit(self) -> None:
        """Start queued jobs, in order, on the slots that are free for them; a job that does not fit
        in the KV cells yet keeps its place at the head of the queue (nothing overtakes it)."""
        while True:
            with self._cond:
                job = self._next_startable()
                if job is None:
                    return
            started = not job.cancel.is_set() and self._start(job)
            with self._cond:
                self._starting = None
                waits = not started and not job.cancel.is_set() and not self._closed
                if waits:
                    self._queue.appendleft(job)
            if waits:
                return
            if not started:  # cancelled before it started, or the scheduler closed while it waited
                job.stop("shutdown")
                self._finish(job, Outcome(cancelled=job.cancel_reason), ran=False)

    def _next_startable(self) -> Job | None:
        """The first queued job that a free slot can take (under the lock), taken off the queue.

        A keystroke's job waits for the slot of the job it superseded, which ends at the next
        step: that slot holds the client's prompt, and any other would evaluate all of it again
        (and evict another client's)."""
        free = self._free_slots()
        if not free:
            return None
        for job in self._queue:
            if job.after_job is not None and job.after_job.ran_on >= 0:
                job.after, job.after_job = job.after_job.ran_on, None
            if job.slot is not None:
                takes = job.slot in free
            elif job.after is not None and job.after not in free:
                takes = not self._running[job.after][0].cancel.is_set()  # (else the slot went to another)
            else:
                takes = True
            if takes:
                self._queue.remove(job)
                self._starting = job
                return job
        return None

    def _free_slots(self) -> set[int]:
        return {seq.id for seq in self.engine.slots if seq.id not in self._running}

    def _start(self, job: Job) -> bool:
        """Prepare ``job`` and start it on a slot; False when it must wait for room."""
        try:
            if job.ids is None:
                if job.prepare is not None:
                    job.prompt, job.stops, job.plan = job.prepare()
                job.ids = (self.engine.tokenize(job.prompt) if isinstance(job.prompt, str)
                           else [int(t) for t in job.prompt])
            with self._cond:
                slot = self._pick_slot(job, self._free_slots())
            gen = self.engine.start(job.ids, job.options, job.stops, cancel=job.cancel, slot=slot)
        except NoRoom:
            return False
        except Exception as exc:  # the request cannot run (too long, bad input): its client gets the error
            if not isinstance(exc, MtpError):
                log.error("request %d could not start:\n%s", job.id, traceback.format_exc())
            self._finish(job, Outcome(error=exc), ran=False)
            return True
        with self._cond:
            self._running[slot] = (job, gen)
            job.ran_on = slot
        log.info("request %d%s: slot %d, %d prompt tokens (%d cached)", job.id,
                 f" ({job.label})" if job.label else "", slot, len(job.ids), gen.prefilled)
        job.post(Started(job.plan, slot))
        return True

    def _pick_slot(self, job: Job, free: set[int]) -> int:
        if job.slot is not None:
            return job.slot
        if job.after in free:
            return job.after
        ids = job.ids or []
        best, best_sim = -1, SIMILAR_PROMPT
        for seq in self.engine.slots:
            if seq.id not in free or not seq.n_main:
                continue
            sim = seq.common_prefix(ids) / max(len(ids), seq.n_main)
            if sim >= best_sim:
                best, best_sim = seq.id, sim
        if best >= 0:
            return best
        return min(free, key=self.engine.last_used)

    def _step(self) -> None:
        running = list(self._running.items())
        try:
            self.engine.step([gen for _, (_, gen) in running])
        except Exception as exc:  # keep serving: the running requests fail, the caches are made consistent
            if not isinstance(exc, MtpError):
                log.error("a step failed:\n%s", traceback.format_exc())
                exc = MtpError(f"internal error: {type(exc).__name__}: {exc}")
            for slot, (job, gen) in running:
                self._end(slot, gen)
                self._finish(job, Outcome(error=exc), ran=True)
            return
        for slot, (job, gen) in running:
            for event in gen.take_events():
                if isinstance(event, Piece):
                    if job.pieces:
                        job.post(event)
                elif isinstance(event, Done):
                    self._end(slot, gen)
                    cancelled = job.cancel_reason if job.cancel.is_set() else None
                    self._finish(job, Outcome(text=event.text, stop_reason=event.stop_reason, stats=event.stats,
                                              cancelled=cancelled), ran=True)

    def _end(self, slot: int, gen: Generation) -> None:
        self.engine.release(gen)
        with self._cond:
            self._running.pop(slot, None)
