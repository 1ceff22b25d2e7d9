"""The speculation loop: one request decoding on one sequence, a step at a time.

A step (blockwise parallel decoding, Stern et al. 2018; speculative sampling,
Leviathan et al. 2023; prompt lookup, Saxena 2023), after the pending token
``x`` (chosen by the main model, not yet evaluated):

1. **propose** - the policy picks a drafter and a length; the drafter proposes
   ``d_1 .. d_K`` for the positions after ``x``;
2. **verify** - one main forward over ``[x, d_1 .. d_K]``, logits for every row
   (the engine runs it, for every active sequence at once);
3. **accept** - ``d_i`` is kept while the main model agrees (greedy: the same
   argmax; sampling: the ``min(1, p/q)`` test); the main model's own token after
   the last kept row becomes the next ``x`` (the bonus token);
4. **commit** - rejected rows leave the main KV cache; the heads are fed only
   kept rows, so they never roll back;
5. **observe** - the policy learns from the outcome and its costs, every
   drafter hears the committed tokens, the text grows and the stops are checked.

:class:`Generation` holds a request's state through those phases;
:meth:`mtpcode.runtime.Engine.step` drives them. Before its first step a
generation reads its prompt (in chunks, beside other sequences' steps).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import numpy as np

from mtpcode import sampling
from mtpcode.drafters.base import Draft, Drafter
from mtpcode.drafters.context import ContextDrafter
from mtpcode.drafters.extended import ExtendedDrafter
from mtpcode.drafters.heads import HeadDrafter
from mtpcode.generation import Done, DraftSource, GenerationOptions, Piece, SamplingOptions, Stats, StepKind
from mtpcode.output import TextOutput
from mtpcode.policy.chooser import DraftPolicy, Plan
from mtpcode.slots import ALL_LOGITS, LAST_LOGITS, NO_LOGITS, Forwards, Segment, Slot, SlotHeads
from mtpcode.stops import StopCondition, StopReason

_perf = time.perf_counter
_cpu = time.thread_time
_PLAIN = (False,)  # the drafted flags of one token of the main model's own


class Acceptor:
    """Step 3: how many drafts the main model's rows accept, and its own next token.

    Greedy: a draft is kept while it equals the argmax of the row before it.
    Sampling: a draft ``t`` drawn from ``q`` is kept with probability
    ``min(1, p[t] / q[t])``, and on rejection the token is drawn from the
    residual ``norm(max(p - q, 0))`` (mtpcode.sampling); a deterministic draft
    (``q`` None: one-hot) is kept with probability ``p[t]`` and otherwise
    replaced by a draw from ``p`` without ``t``. Either way the output follows
    the main model exactly.
    """

    __slots__ = ("_p", "_scratch", "greedy", "rng", "warper")

    def __init__(self, n_vocab: int, options: SamplingOptions, seed: int | None) -> None:
        self.greedy = options.greedy
        self.rng = None if self.greedy else np.random.default_rng(seed)
        self.warper = None if self.greedy else sampling.Warper(n_vocab, options)
        if self.warper is not None:
            self._p = self.warper.new_buffer()
            self._scratch = self.warper.new_buffer()

    def pick(self, forwards: Forwards, segment: Segment) -> int:
        """The main model's token after the last row of ``segment`` (a prompt chunk) in the last forward."""
        if self.warper is None or self.rng is None:
            return forwards.argmax(segment, len(segment.tokens) - 1)
        return sampling.sample(self.warper.probs(forwards.logits(segment)[-1], self._p), self.rng)

    def accept(self, forwards: Forwards, segment: Segment, draft: Draft) -> tuple[int, int]:
        """(drafts accepted, the main model's next token) for the ``draft.n + 1`` rows of the verify
        ``segment`` in the last forward."""
        n = draft.n
        if self.warper is None or self.rng is None:
            for i in range(n):
                target = forwards.argmax(segment, i)
                if target != draft.tokens[i]:
                    return i, target
            return n, forwards.argmax(segment, n)
        rows = forwards.logits(segment)
        rng, p = self.rng, self._p
        for i in range(n):
            self.warper.probs(rows[i], p)
            token, q = int(draft.tokens[i]), draft.q[i]
            if q is None:
                if not sampling.accept_deterministic(p, token, rng):
                    return i, sampling.residual_deterministic(p, token, rng, self._scratch)
            elif not sampling.accept(p, q, token, rng):
                return i, sampling.residual(p, q, rng, self._scratch)
        return n, sampling.sample(self.warper.probs(rows[n], p), rng)


@dataclass
class Request:
    """A checked request (:meth:`mtpcode.runtime.Engine.start`): the prompt's token ids, the
    options, every stop condition, the cancel event, the sampling seed (None: greedy) and the
    text after the cursor's token ids."""

    ids: list[int]
    options: GenerationOptions
    stops: Sequence[StopCondition] = ()
    cancel: threading.Event | None = None
    seed: int | None = None
    suffix: list[int] = field(default_factory=list)


class Vocabulary(Protocol):
    """What a generation needs of the model (mtpcode.llama.Model)."""

    n_vocab: int

    def token_bytes(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...


class Phase(Enum):
    PREFILL = "prefill"  # reading the prompt
    DECODE = "decode"
    DONE = "done"


class Generation:
    """One request on one sequence: its drafters, policy, acceptance, output and stats.

    Made by :meth:`mtpcode.runtime.Engine.start`; the engine's steps fill
    ``events`` (``Piece`` events, then one ``Done``), which :meth:`take_events`
    hands out.
    """

    # (fixed attributes: the decoding path reads them after every forward, when the forward has
    # pushed Python's objects out of the CPU caches; slots touch fewer cache lines than a dict)
    __slots__ = ("_decode_start", "_end", "_pending_only", "_reading", "acceptor", "by_kind", "cancel", "context",
                 "cost_clock", "draft", "drafters", "drafting", "events", "forwards", "heads", "ids", "is_eog",
                 "max_drafts", "n_total", "native_s", "options", "output", "pending", "phase", "plan_", "policy",
                 "prefilled", "propose_cost", "segment", "seq", "stats", "suffix", "verify_tokens")

    def __init__(self, request: Request, forwards: Forwards, seq: Slot, reuse: int, model: Vocabulary, *,
                 heads: int, context: ContextDrafter | None, policy: DraftPolicy,
                 cost_clock: Callable[[], float]) -> None:
        self.forwards = forwards
        self.seq = seq
        self.ids = ids = request.ids
        self.options = options = request.options
        self.cancel = request.cancel
        self.suffix = request.suffix
        self.policy = policy
        self.is_eog = model.is_eog
        self.cost_clock = cost_clock
        self.acceptor = Acceptor(model.n_vocab, options.sampling, request.seed)
        self.output = TextOutput(model.token_bytes, request.stops)
        self.stats = Stats(prompt_tokens=len(ids), heads_used=heads, drafted_tokens=[0] * heads,
                           accepted_tokens=[0] * heads, seed=request.seed, context_draft=context is not None)
        # the drafters, and which one serves each kind of plan
        self.context = context
        self.heads = (HeadDrafter(SlotHeads(forwards, seq), heads, self.acceptor.warper, self.acceptor.rng)
                      if heads else None)
        self.drafters: list[Drafter] = [d for d in (self.heads, self.context) if d is not None]
        self.by_kind: dict[StepKind, Drafter] = {}
        if self.heads is not None:
            self.by_kind[StepKind.HEADS] = self.heads
        if self.context is not None:
            self.by_kind[StepKind.CONTEXT] = self.context
            if self.heads is not None:
                self.by_kind[StepKind.CONTEXT_HEADS] = ExtendedDrafter(self.context, self.heads)
        self.drafting = bool(self.drafters)  # else every step is plain: no policy to ask or teach
        # a verify's rows must fit in one batch
        self.max_drafts = min(max(heads, context.max_draft if context else 0), forwards.n_batch - 1)
        self.draft = Draft(self.max_drafts)
        self.plan_: Plan = Plan()
        self.verify_tokens = np.zeros(self.max_drafts + 1, dtype=np.int32)
        self._pending_only = self.verify_tokens[:1]
        self.segment = Segment(seq, trunk=heads > 0)
        self.phase = Phase.PREFILL
        self.prefilled = reuse  # prompt tokens in the cache
        self.pending = -1
        self.n_total = len(ids)  # prompt and generated tokens
        self._end = min(len(ids) + options.max_tokens, seq.n_ctx)  # n_total where a limit is reached
        self.events: list[Piece | Done] = []
        self.native_s = 0.0  # decode time in llama.cpp
        self.propose_cost = 0.0  # the cost clock's time of this step's proposal
        self._reading = True  # the steps so far read the prompt (their time is prefill time)
        self._decode_start = (0.0, 0.0)  # the wall and thread CPU clocks when decoding started

    @property
    def finished(self) -> bool:
        return self.phase is Phase.DONE

    def take_events(self) -> list[Piece | Done]:
        events, self.events = self.events, []
        return events

    # -- reading the prompt ----------------------------------------------------

    def prompt_chunk(self, budget: int) -> Segment:
        """The next ``budget`` prompt tokens as a segment (logits for the prompt's last row)."""
        start = self.prefilled
        end = min(len(self.ids), start + budget)
        seg = self.segment
        seg.tokens = np.asarray(self.ids[start:end], dtype=np.int32)
        seg.verify = False
        seg.logits = LAST_LOGITS if end == len(self.ids) else NO_LOGITS
        return seg

    def after_prompt_chunk(self) -> None:
        """The chunk is in the cache; after the last one, the drafters start and the first token is chosen."""
        seq, seg = self.seq, self.segment
        self.stats.prompt_tokens_processed += len(seg.tokens)
        self.prefilled = seq.n_main
        if self.prefilled < len(self.ids):
            return
        self.pending = self.acceptor.pick(self.forwards, seg)
        for drafter in self.drafters:
            drafter.begin(self.ids, self.suffix)
        self.policy.begin()
        self.phase = Phase.DECODE
        self._emit([self.pending], _PLAIN)

    # -- a step ------------------------------------------------------------------

    def room(self, share: int) -> int:
        """Drafts this step may verify: the context, the output limit and the step's ``share`` of
        the batch (other sequences verify beside it) leave room for them."""
        room = min(self.seq.n_ctx - self.n_total - 1, self.options.max_tokens - self.stats.generated_tokens - 1)
        return max(0, min(room, self.max_drafts, share))

    def plan(self, share: int, batch: int = 1) -> Plan:
        """1. propose, first half: the policy's choice, from the context's match (free to look up);
        ``batch`` sequences decode in this step's forward."""
        if not self.drafting:
            return self.plan_  # always Plan(): plain, and the draft stays empty
        draft = self.draft
        draft.clear()
        self.propose_cost = 0.0
        room = self.room(share)
        match = self.context.lookup(self.pending) if self.context is not None and room else None
        self.plan_ = self.policy.plan(match, room, self.seq.n_main, batch)
        draft.match = match
        return self.plan_

    def propose(self) -> Segment:
        """1. propose, second half: the chosen drafter drafts; the verify's segment."""
        plan, draft = self.plan_, self.draft
        drafter = self.by_kind.get(plan.kind) if self.drafting else None
        if drafter is not None:
            c0 = self.cost_clock()
            drafter.propose(self.pending, plan.drafts, draft)
            self.propose_cost += self.cost_clock() - c0
            self.native_s += draft.native_s
        n = draft.n
        tokens = self.verify_tokens
        tokens[0] = self.pending
        seg = self.segment
        if n:
            tokens[1: n + 1] = draft.tokens[:n]
            seg.tokens = tokens[: n + 1]
        else:
            seg.tokens = self._pending_only  # (a plain step: no slicing on the decoding path)
        seg.verify = True
        seg.logits = ALL_LOGITS
        return seg

    def head_catch_up(self, k: int) -> None:
        """Head ``k`` (0-based) is about to be fed with other sequences': a head that sat out steps
        catches up on many rows, which is not what a draft costs."""
        if self.forwards.head_lag(self.seq, k) > len(self.forwards.heads) + 1:
            self.draft.typical = False

    def charge_heads(self, native: float, cost: float) -> None:
        """This generation's share of head forwards run for several sequences at once."""
        self.draft.native_s += native
        self.propose_cost += cost

    def settle(self, verify_native: float, verify_cost: float) -> None:
        """3. accept, 4. commit, 5. observe, after the verify forward."""
        plan, draft, seg = self.plan_, self.draft, self.segment
        accepted, nxt = self.acceptor.accept(self.forwards, seg, draft)  # 3. accept
        self.forwards.commit(seg, 1 + accepted)  # 4. commit
        kept = draft.tokens[:accepted].tolist() if accepted else []
        self.native_s += verify_native  # 5. observe
        if self.drafting:
            self.policy.observe(plan, draft.match, accepted, kept[0] if kept else nxt, verify_cost,
                                self.propose_cost, plan.head_forwards if draft.typical else 0)
            committed = [self.pending, *kept]
            for drafter in self.drafters:
                drafter.accept(committed)
        self._count(plan, draft, accepted)
        self.pending = nxt
        self._emit([*kept, nxt], [True] * accepted + [False] if accepted else _PLAIN)

    def _count(self, plan: Plan, draft: Draft, accepted: int) -> None:
        stats = self.stats
        stats.main_forwards += 1
        kind = plan.kind  # (a str enum: the key is its value)
        stats.forwards_by_source[kind] = stats.forwards_by_source.get(kind, 0) + 1
        stats.tokens_by_source[kind] = stats.tokens_by_source.get(kind, 0) + accepted + 1
        for i, source in enumerate(draft.sources):
            ok = int(i < accepted)
            stats.drafted_by_source[source.value] += 1
            stats.accepted_by_source[source.value] += ok
            if source is DraftSource.HEADS:
                stats.drafted_tokens[i] += 1
                stats.accepted_tokens[i] += ok

    # -- output ------------------------------------------------------------------

    def _limit(self, more: int) -> StopReason | None:
        """The limit the output reaches with ``more`` tokens than it has, if any: the token budget
        or the context."""
        if self.n_total + more < self._end:
            return None
        if self.stats.generated_tokens + more >= self.options.max_tokens:
            return StopReason.MAX_TOKENS
        return StopReason.CONTEXT

    def _emit(self, tokens: list[int], drafted: Sequence[bool]) -> None:
        """Commit chosen tokens to the output (up to the first end token or limit), then end the
        generation if anything says so."""
        reason: StopReason | None = None
        n = len(tokens)
        for i, token in enumerate(tokens):
            if self.is_eog(token):
                reason, n = StopReason.EOS, i
                break
            if self.n_total + i >= self._end:
                reason, n = self._limit(i), i
                break
        emit = tokens if n == len(tokens) else tokens[:n]
        self.n_total += n
        self.stats.generated_tokens += n
        text = self.output.push(emit)
        if emit or text:
            self.events.append(Piece(text=text, token_ids=tuple(emit), drafted=tuple(drafted[:n])))
        reason = reason or self.output.stop_reason or self._limit(0)
        if reason is None and self.cancel is not None and self.cancel.is_set():
            reason = StopReason.INTERRUPTED
        if reason is not None:
            self.finish(reason)

    def account(self, wall: float) -> None:
        """A step this generation took part in took ``wall`` seconds. The steps up to the one that
        chose the first token are prefill time; decode time runs from there to the end, read from
        the clocks twice (a clock read per step is a system call on the decoding path)."""
        if self._reading:
            self.stats.prefill_s += wall
            if self.phase is not Phase.PREFILL:
                self._reading = False
                self._decode_start = (_perf(), _cpu())

    def _close_stats(self) -> None:
        stats = self.stats
        if not self._reading:
            t0, c0 = self._decode_start
            stats.decode_s, stats.decode_cpu_s = _perf() - t0, _cpu() - c0
        stats.python_s = max(0.0, stats.decode_s - self.native_s)

    def finish(self, reason: StopReason) -> None:
        """End the generation: the held-back text, then ``Done``."""
        if self.phase is Phase.DONE:
            return
        self._close_stats()
        if self.phase is not Phase.PREFILL:
            tail = self.output.push([], final=True)
            if tail:
                self.events.append(Piece(text=tail, token_ids=(), drafted=()))
        self.phase = Phase.DONE
        self.events.append(Done(text=self.output.final_text, stop_reason=self.output.stop_reason or reason,
                                stats=self.stats))
