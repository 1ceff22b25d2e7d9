"""The drafting policy: what each step drafts, for the most expected tokens per second.

Every step chooses between no draft, the heads alone, the context alone, and
a context draft extended by the heads, and the draft length. Each option's
expected yield comes from the acceptance estimates (:mod:`.heads`,
:mod:`.context`), its cost from the cost model (:mod:`.costs`): the choice
maximises (1 + expected accepted drafts) / (cost of the verify and the head
forwards). The policy never changes *which* tokens come out under greedy
decoding, only how many are verified per forward.

Costs are learned per *batch regime*: alone, or stepped beside other
sequences in one forward (2, 3-4, 5-8, ... of them). Beside others a
sequence is charged its rows' share of the shared forward, and a row costs
something else there than alone (on a CPU with a small model: about what
its share of the weights and its attention cost, where alone the second row
costs as much as the first); a table learned alone would keep a sequence
drafting where, beside three others, its drafts slow everyone down.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

from mtpcode.drafters.base import Match
from mtpcode.generation import StepKind
from mtpcode.policy.context import ContextAcceptance
from mtpcode.policy.costs import Costs, FixedCosts, MeasuredCosts
from mtpcode.policy.heads import HeadAcceptance, HeadSchedule

# Each extra row of a size never measured is assumed to cost this fraction of a one-row forward
# when deciding whether to measure it once: the prior table comes from another machine, and where
# rows are cheaper than there, long drafts would otherwise never be tried, hence never measured.
OPTIMISTIC_ROW = 0.1


@dataclass(frozen=True)
class Plan:
    """What one step drafts: ``context`` tokens from a context match, then heads ``context..heads-1``
    (``heads <= context``: no head runs). The verify has ``rows`` rows."""

    context: int = 0
    heads: int = 0

    @property
    def drafts(self) -> int:
        return max(self.context, self.heads)

    @property
    def rows(self) -> int:
        return self.drafts + 1

    @property
    def head_forwards(self) -> int:
        return max(0, self.heads - self.context)

    @functools.cached_property
    def kind(self) -> StepKind:
        if self.context and self.heads > self.context:
            return StepKind.CONTEXT_HEADS
        if self.context:
            return StepKind.CONTEXT
        return StepKind.HEADS if self.heads else StepKind.PLAIN


class DraftPolicy:
    """Chooses each step's :class:`Plan` from acceptance estimates and costs, and learns from outcomes.

    ``max_heads``: heads it may draft with; ``adaptive`` False drafts with all of
    them every step (no context drafts). ``measured`` False uses the fixed cost
    model (seeded sampling). ``max_draft``: the longest draft.
    """

    # A context draft must promise this much more than the heads' choice: what the cost table leaves
    # out (the Python of a longer step) and the optimism of choosing by estimates (the best-looking
    # option is the likeliest to be overestimated) are paid by every draft.
    switch_margin = 1.15

    def __init__(self, max_heads: int, adaptive: bool, measured: bool = True, max_draft: int = 16,
                 flash_attn: bool = False) -> None:
        self.max_heads = max_heads
        self.max_draft = max(max_draft, max_heads)
        self.flash_attn = flash_attn
        self.costs: Costs = MeasuredCosts(self.max_draft + 1, flash_attn) if measured else FixedCosts()
        # the cost tables per batch regime (1: alone, the one above); the fixed model has one for all
        self._by_regime: dict[int, Costs] = {1: self.costs}
        self.heads = HeadAcceptance(max_heads)
        self.schedule = HeadSchedule(max_heads, adaptive)
        self.context = ContextAcceptance(self.max_draft)

    @property
    def adaptive(self) -> bool:
        return self.schedule.adaptive

    @property
    def steps(self) -> int:
        return self.schedule.steps

    @property
    def learned(self) -> bool:
        """Whether it is past its warm-up (a state worth saving)."""
        return self.schedule.steps > self.schedule.warmup_steps

    def begin(self) -> None:
        """A new generation (what was learned of the last text's context counts less)."""
        self.context.begin()

    # -- choosing ------------------------------------------------------------

    def plan(self, match: Match | None, room: int, n_cached: int = 0, batch: int = 1) -> Plan:
        """This step's plan: the heads' choice, replaced by a context draft (extended by heads when
        its continuation is short) when that is expected to pay more. ``room`` caps the drafts
        (context and output limits); ``n_cached`` is the context length; ``batch`` the sequences
        the step's forward carries (this one included)."""
        self._regime(batch)
        self.costs.at(n_cached)
        k = min(self.schedule.choose(self._rate, self.costs.ready), room)
        in_warmup = self.schedule.in_warmup or not self.costs.ready
        if match is None or room < 1 or in_warmup or not match.tokens:
            return Plan(heads=k)
        if self.schedule.adaptive and k != self.schedule.k:  # a heads probe: let it run, its estimates need it
            return Plan(heads=k)
        bucket = self.context.bucket(match)
        available = min(len(match.tokens), room, self.max_draft)
        best_l, best_rate = self._best_context(bucket, available)
        plan, rate = Plan(heads=k), self._rate(k)
        if best_rate > self.switch_margin * rate:
            plan, rate = Plan(context=best_l), best_rate
        elif self.costs.measured:
            size = self._unmeasured_size(bucket, available)
            if size:  # the cost of that size is only a prior: measure it once
                return Plan(context=size)
        # context extended by heads: the continuation ran out before the heads' reach
        if self.max_heads and available < min(self.max_heads, room) and best_l == available:
            for heads in range(available + 1, min(self.max_heads, room) + 1):
                mixed = self._mixed_rate(bucket, available, heads)
                if mixed > self.switch_margin * rate:
                    plan, rate = Plan(context=available, heads=heads), mixed
        return plan

    def _regime(self, batch: int) -> None:
        """Plan and learn with the cost table of ``batch`` sequences per forward (a power-of-two
        bucket: 1, 2, 4, 8, ...)."""
        if not self.costs.measured:
            return  # (seeded sampling: the plans must not depend on the other sequences)
        regime = 1 << max(0, batch - 1).bit_length()
        costs = self._by_regime.get(regime)
        if costs is None:
            costs = self._by_regime[regime] = MeasuredCosts(self.max_draft + 1, self.flash_attn)
        self.costs = costs

    def _rate(self, k: int) -> float:
        """Expected tokens per second of drafting ``k`` heads."""
        costs = self.costs
        return self.heads.expected_tokens(k) / (costs.verify(k + 1) + k * costs.head())

    def _best_context(self, bucket: int, available: int) -> tuple[int, float]:
        """The context draft length with the most expected tokens per second, and that rate."""
        best_l, best_rate = 0, 0.0
        tokens = 1.0
        for i, c in enumerate(self.context.chain(bucket, available)):
            tokens += c
            rate = tokens / self.costs.verify(i + 2)
            if rate > best_rate:
                best_l, best_rate = i + 1, rate
        return best_l, best_rate

    def _unmeasured_size(self, bucket: int, available: int) -> int:
        """A draft length worth measuring: the best one if each extra row cost only
        :data:`OPTIMISTIC_ROW` of a one-row forward, when its size was never measured and it is
        expected to yield at least one more token."""
        best_l, best_rate, tokens = 0, 1.0, 1.0
        for i, c in enumerate(self.context.chain(bucket, available)):
            tokens += c
            rate = tokens / (1.0 + OPTIMISTIC_ROW * (i + 1))
            if rate > best_rate:
                best_l, best_rate = i + 1, rate
        if best_l and not self.costs.measured_rows(best_l + 1) and tokens >= 2.0:
            return best_l
        return 0

    def _mixed_rate(self, bucket: int, n_context: int, heads: int) -> float:
        chain = self.context.chain(bucket, n_context)
        tokens = 1.0 + sum(chain)
        c = chain[-1] if chain else 1.0
        for i in range(n_context, heads):
            c *= self.context.mixed_q(i, self.heads.chain)
            tokens += c
        cost = self.costs.verify(heads + 1) + (heads - n_context) * self.costs.head()
        return tokens / cost

    # -- learning ------------------------------------------------------------

    def observe(self, plan: Plan, match: Match | None, accepted: int, first: int, verify_s: float,
                head_s: float, heads_run: int) -> None:
        """One step's outcome: ``accepted`` drafts of ``plan`` were accepted, ``first`` is the token
        after the pending one (the first accepted draft, or the main model's own), the verify took
        ``verify_s`` and ``heads_run`` head forwards ``head_s`` (0 runs: not a draft's time)."""
        if plan.context and match is not None:
            self.context.observe_draft(self.context.bucket(match), plan.context, plan.heads, accepted,
                                       self.heads.chain)
        else:
            k = plan.heads
            if self.schedule.is_probe(k) and self.costs.ready:  # (judged against timings of this regime)
                cost = self.costs.step_cost(k + 1, verify_s) + k * self.costs.head()
                if (1 + accepted) / cost > self._rate(self.schedule.k):  # a probe beat the choice
                    self.schedule.probe_won(k)
            self.heads.observe(k, accepted)
        self.costs.observe(plan.rows, verify_s, head_s, heads_run)
        self.context.observe_first(match, bool(plan.context), first)

    # -- persistence -----------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What this policy learned (estimates, not its schedule), for :meth:`restore`: the costs
        alone at the top level, those beside other sequences under ``batched``."""
        batched = {str(r): c.state() for r, c in self._by_regime.items() if r > 1 and c.ready}
        return {**self.heads.state(), **self._by_regime[1].state(), **self.context.state(),
                **({"batched": batched} if batched else {})}

    def restore(self, state: Any) -> bool:
        """Start from a :meth:`state` of an earlier run (no warm-up); False (and nothing changed)
        when ``state`` is not a valid state for this policy. A state without context estimates or
        batched costs (an older file) restores the rest."""
        alone = self._by_regime[1]
        parts = (self.heads, alone, self.context)
        before = [copy.deepcopy(part) for part in parts]
        if not isinstance(state, dict) or not all(part.restore(state) for part in parts):
            self.heads, alone, self.context = before  # type: ignore[assignment]
            self.costs = self._by_regime[1] = alone
            return False
        batched = state.get("batched")
        if alone.measured and isinstance(batched, dict):
            for key, saved in batched.items():
                costs = MeasuredCosts(self.max_draft + 1, self.flash_attn)
                if isinstance(key, str) and key.isdigit() and int(key) > 1 and costs.restore(saved):
                    self._by_regime[int(key)] = costs
        self.costs = alone
        self.schedule.resume()
        return True
