"""How far to trust a context draft: acceptance estimates per match bucket and draft position."""

from __future__ import annotations

from typing import Any

from mtpcode.drafters.base import Match
from mtpcode.policy.costs import ALPHA
from mtpcode.policy.heads import RESTORED_OBSERVATIONS

# Prior probability that the first token of a context draft is accepted, per match length
# bucket (1, 2, 3, 4, 5-7, 8-15, 16+ tokens), after a step where the context's prediction was
# right: optimistic enough that each bucket gets tried, so that measurements replace it.
CONTEXT_PRIOR = (0.3, 0.45, 0.55, 0.65, 0.75, 0.85, 0.9)
# After a miss the prior is this fraction of it: copying goes on in runs, and a prediction that
# was just wrong is likelier to be wrong again.
AFTER_MISS = 0.6
LENGTH_BUCKETS = len(CONTEXT_PRIOR)
N_BUCKETS = 4 * LENGTH_BUCKETS  # lengths x (text, suffix) x (after a miss, after a hit)
BUCKET_PRIOR = tuple(p * AFTER_MISS for p in CONTEXT_PRIOR) * 2 + CONTEXT_PRIOR * 2


def match_bucket(length: int, where: str = "text", hit: bool = False) -> int:
    """Acceptance-estimate bucket of a context match of ``length`` tokens found in the text or the
    suffix, after a step where the context's prediction was right (``hit``) or not: 0..6 by length
    (1, 2, 3, 4, 5-7, 8-15, 16+), plus 7 for the suffix (a copy of the text after the cursor and a
    repetition of the text before it are accepted at different rates), plus 14 after a hit."""
    if length <= 4:
        bucket = max(length, 1) - 1
    else:
        bucket = 4 if length < 8 else 5 if length < 16 else 6
    return bucket + (LENGTH_BUCKETS if where == "suffix" else 0) + (N_BUCKETS // 2 if hit else 0)


class ContextAcceptance:
    """Acceptance of context drafts, and of the heads that carry one on.

    For a match in a given bucket it keeps, per draft position i, the running
    probability that the i-th context token is accepted when the ones before
    it were; positions never tried take the estimate of the position before
    them. Every step with a match updates the first position's estimate,
    drafted or not (:meth:`observe_first`). For heads after a fully accepted
    context draft it keeps conditional estimates per position (``mix_q``),
    whose prior is the heads' own chain.
    """

    weight = 2  # observations the prior of a context position is worth
    memory = 4  # observations of earlier generations an estimate keeps at a new one

    def __init__(self, max_draft: int, alpha: float = ALPHA) -> None:
        self.max_draft = max_draft
        self.alpha = alpha
        self.q = [[p] * max_draft for p in BUCKET_PRIOR]
        self.n = [[0] * max_draft for _ in range(N_BUCKETS)]
        self.mix_q = [0.0] * max_draft
        self.mix_n = [0] * max_draft
        self.recent_hit = False  # whether the context's last prediction was right

    def bucket(self, match: Match) -> int:
        return match_bucket(match.length, match.where, self.recent_hit)

    def begin(self) -> None:
        """A new generation: what was learned on earlier prompts counts as at most ``memory``
        observations per position, so that this prompt's own outcomes take over quickly (how much
        a text repeats itself is a property of the text)."""
        for ns in self.n:
            for i, n in enumerate(ns):
                if n > self.memory:
                    ns[i] = self.memory
        self.recent_hit = False

    def chain(self, bucket: int, n: int) -> list[float]:
        """P(context drafts 1..i all accepted), i = 1..n, for a match in ``bucket``."""
        qs, ns = self.q[bucket], self.n[bucket]
        out = []
        chain = 1.0
        q = qs[0]
        for i in range(n):
            q = qs[i] if ns[i] else q  # an untried position: the one before's estimate
            chain *= q
            out.append(chain)
        return out

    def mixed_q(self, i: int, head_chain: list[float]) -> float:
        """Conditional acceptance of a head's draft at position i after a fully accepted context draft."""
        if self.mix_n[i]:
            return self.mix_q[i]
        # prior: the chance that the heads' drafts 1..i+1 are all right, which is at most the
        # conditional one (a ratio of two small estimates would be a noisy, optimistic prior)
        return head_chain[i] if i < len(head_chain) else 0.0

    def observe_draft(self, bucket: int, n_context: int, n_total: int, accepted: int,
                      head_chain: list[float]) -> None:
        """A step that drafted ``n_context`` context tokens (then heads up to ``n_total``), of which
        the first ``accepted`` were accepted."""
        qs, ns = self.q[bucket], self.n[bucket]
        for i in range(min(accepted + 1, n_context)):  # position i was tested: all before it were accepted
            if not ns[i] and i:  # first test of this position: start from the estimate it had (the one before's)
                qs[i] = next((qs[j] for j in range(i - 1, -1, -1) if ns[j]), qs[0])
            ns[i] += 1
            # the estimate so far counts as ``weight`` observations: one miss does not rule a position out
            qs[i] += max(self.alpha, 1.0 / (ns[i] + self.weight)) * (float(accepted > i) - qs[i])
        for i in range(n_context, min(accepted + 1, n_total)):
            self.mix_n[i] += 1
            prior = self.mixed_q(i, head_chain) if self.mix_n[i] == 1 else self.mix_q[i]
            self.mix_q[i] = prior + max(self.alpha, 1.0 / self.mix_n[i]) * (float(accepted > i) - prior)

    def observe_first(self, match: Match | None, drafted: bool, first: int) -> None:
        """What the step produced after the pending token (``first``): whether the context predicted it.
        A step that did not draft from the context still tells, for free, whether the first token of
        a context draft would have been accepted; that observation goes to the estimates too."""
        if match is None or not match.tokens:
            self.recent_hit = False
            return
        hit = match.tokens[0] == first
        if not drafted:
            qs, ns = self.q[self.bucket(match)], self.n[self.bucket(match)]
            ns[0] += 1
            qs[0] += max(self.alpha, 1.0 / (ns[0] + self.weight)) * (float(hit) - qs[0])
        self.recent_hit = hit

    def state(self) -> dict[str, Any]:
        return {"context": {"q": [list(q) for q in self.q], "n": [list(n) for n in self.n],
                            "mix_q": list(self.mix_q), "mix_n": list(self.mix_n)}}

    def restore(self, state: Any) -> bool:
        """Take the estimates of a :meth:`state`; a state without them (an older file) keeps the
        priors and is valid; False (nothing changed) when they are malformed."""
        ctx = state.get("context") if isinstance(state, dict) else None
        if ctx is None:
            return isinstance(state, dict)
        try:
            cq = [[float(x) for x in q] for q in ctx["q"]]
            cn = [[int(x) for x in n] for n in ctx["n"]]
            mq = [float(x) for x in ctx["mix_q"]]
            mn = [int(x) for x in ctx["mix_n"]]
        except (KeyError, TypeError, ValueError, AttributeError):
            return False
        shape_ok = (len(cq) == N_BUCKETS == len(cn)
                    and all(len(q) == self.max_draft for q in cq) and all(len(n) == self.max_draft for n in cn)
                    and len(mq) == self.max_draft == len(mn))
        if not shape_ok or not all(0.0 <= x <= 1.0 for q in cq for x in q) or not all(0.0 <= x <= 1.0 for x in mq):
            return False
        cap = RESTORED_OBSERVATIONS
        self.q, self.n = cq, [[min(x, cap) for x in n] for n in cn]
        self.mix_q, self.mix_n = mq, [min(x, cap) for x in mn]
        return True
