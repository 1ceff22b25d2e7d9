"""How many heads to draft with: acceptance estimates per head, and the schedule that picks and probes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mtpcode.policy.costs import ALPHA

# Before a head's drafts were seen, drafts 1..k are taken to be all accepted with probability
# HEAD_PRIOR ** k: optimistic enough that the policy tries each head, so measurements replace it.
HEAD_PRIOR = 0.6
# A restored state's counts are capped at this many observations, so that new ones move the
# estimates soon (another machine's load, another text).
RESTORED_OBSERVATIONS = 5


class HeadAcceptance:
    """Per k, a running estimate ``chain[k-1]`` of the chance that drafts 1..k are all accepted.

    A verify of K head drafts then yields ``1 + chain[0] + ... + chain[K-1]``
    tokens on average. The first observations of a head average plainly, later
    ones with weight ``alpha``.
    """

    def __init__(self, max_heads: int, alpha: float = ALPHA) -> None:
        self.max_heads = max_heads
        self.alpha = alpha
        self.chain = [HEAD_PRIOR ** (k + 1) for k in range(max_heads)]  # floats: read every step
        self.seen = [0] * max_heads

    def expected_tokens(self, k: int) -> float:
        """Tokens a verify of ``k`` head drafts yields on average (the main model's own one included)."""
        return 1.0 + sum(self.chain[:k])

    def observe(self, k: int, accepted: int) -> None:
        """A step that drafted ``k`` heads, of which the first ``accepted`` were accepted."""
        for i in range(k):
            self.seen[i] += 1
            self.chain[i] += max(self.alpha, 1.0 / self.seen[i]) * (float(accepted > i) - self.chain[i])

    def state(self) -> dict[str, Any]:
        return {"chain": list(self.chain), "seen": list(self.seen)}

    def restore(self, state: Any) -> bool:
        try:
            chain = [float(c) for c in state["chain"]]
            seen = [int(n) for n in state["seen"]]
        except (KeyError, TypeError, ValueError, AttributeError):
            return False
        if (len(chain) != self.max_heads or len(seen) != self.max_heads
                or not all(0.0 <= c <= 1.0 for c in chain) or not all(n >= 0 for n in seen)):
            return False
        self.chain, self.seen = chain, [min(n, RESTORED_OBSERVATIONS) for n in seen]
        return True


class HeadSchedule:
    """Picks the number of heads each step: a warm-up, then the best expected rate, with probes.

    Now and then it tries K+1 or K-1 (a probe) to keep the estimates of the
    neighbours fresh. A probe is not free (the neighbour may be slower, and a
    new batch shape makes llama.cpp rebuild its compute graph, also for the
    step after it), so while probes keep confirming the choice the interval
    between them doubles, from ``probe_min`` up to ``probe_max`` steps; it
    drops back to ``probe_min`` as soon as the choice changes or a probe
    yields more tokens per second than the choice is expected to.
    """

    probe_min = 16
    probe_max = 512
    probe_after_win = 4  # steps to the next probe after one that beat the choice
    # First steps: plain (the cost of a 1-row forward, and no loss), then one head (its
    # acceptance, the cost of 2 rows). More heads are tried when the estimates say they would
    # pay: the prior on heads not yet seen is optimistic.
    warmup = (0, 0, 1, 1, 1, 1)

    def __init__(self, max_heads: int, adaptive: bool) -> None:
        self.max_heads = max_heads
        self.adaptive = adaptive and max_heads > 0
        self.k = max_heads  # the current choice
        self.steps = 0
        self.probes = 0
        self.probe_interval = self.probe_min
        self.warmup_steps = len(self.warmup) if self.adaptive else 2
        self._next_probe = self.warmup_steps + self.probe_min
        self._confirm: int | None = None  # a probe that won, to repeat at the next probe

    @property
    def in_warmup(self) -> bool:
        return self.steps <= self.warmup_steps

    def choose(self, rate: Callable[[int], float], costs_ready: bool) -> int:
        """Heads for this step: the warm-up's, the one with the best ``rate``, or a probe."""
        self.steps += 1
        if not self.adaptive:
            return self.max_heads
        if self.steps <= self.warmup_steps or not costs_ready:
            # (no timing yet after the warm-up: steps interrupted between choose and observe)
            return min(self.warmup[min(self.steps, self.warmup_steps) - 1], self.max_heads)
        best = max(range(self.max_heads + 1), key=rate)
        if best != self.k:  # the estimates moved: look around again soon
            self._look_again_soon()
        self.k = best
        if self.steps < self._next_probe:
            return best
        self.probes += 1
        self.probe_interval = min(2 * self.probe_interval, self.probe_max)
        self._next_probe = self.steps + self.probe_interval
        confirm, self._confirm = self._confirm, None
        if confirm is not None and confirm != best:
            return confirm
        up, down = best + 1, best - 1
        order = (up, down) if self.probes % 2 else (down, up)
        return next((k for k in order if 0 <= k <= self.max_heads), best)

    def is_probe(self, k: int) -> bool:
        """Whether a step that drafted ``k`` heads was a probe (not the current choice)."""
        return self.adaptive and k != self.k and self.steps > self.warmup_steps

    def probe_won(self, k: int) -> None:
        """A probe of ``k`` heads beat the choice's expected rate: try it again soon."""
        self._look_again_soon(self.probe_after_win)
        self._confirm = k

    def _look_again_soon(self, steps: int | None = None) -> None:
        self.probe_interval = self.probe_min
        self._next_probe = min(self._next_probe, self.steps + (steps or self.probe_min))

    def resume(self) -> None:
        """Start after the warm-up (the estimates were restored)."""
        self.steps = self.warmup_steps
        self._next_probe = self.steps + self.probe_min
