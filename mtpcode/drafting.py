"""Where draft tokens come from, and how many of them a step verifies.

Two drafters sit behind one small interface, as in llama.cpp's speculative
loop (begin / draft / accept):

* :class:`HeadDrafter` - the bundle's multi-token-prediction heads. Head k,
  run on the trunk row of the last evaluated token, proposes the token k
  positions after the pending one.
* :class:`ContextDrafter` - prompt lookup: the longest recent match of the
  last 1..4 tokens in the text so far (prompt and generated tokens) or in the
  text after the cursor (the suffix), and the tokens that followed it there.
  Code repeats itself - a line retyped before identical text, a duplicated
  function, a test case like the one above it - and there these drafts are
  nearly always right.

:class:`DraftPolicy` chooses, every step, between no draft, the heads alone,
the context alone, and a context draft extended by the heads (the heads fill
the positions after a context continuation that ended early), and the draft
length: whatever maximises the expected accepted tokens per second of
measured verify cost. It keeps acceptance estimates per source, per match
length and per draft position.

None of this changes which tokens come out under greedy decoding, only how
many are verified per forward. Under sampling a deterministic (context) draft
is the special case ``q = one-hot`` of speculative sampling: accepted with
probability ``p(token)``, and on rejection the replacement is drawn from ``p``
without that token, renormalised; the output follows ``p`` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mtpcode import sampling

# Step kinds (what drafted the step's tokens), as counted in Stats.
PLAIN, HEADS, CONTEXT, CONTEXT_HEADS = "plain", "heads", "context", "context+heads"
STEP_KINDS = (PLAIN, HEADS, CONTEXT, CONTEXT_HEADS)
# Where a drafted token came from.
TOKEN_SOURCES = (HEADS, CONTEXT)


# ---------------------------------------------------------------------------
# the context drafter


@dataclass(frozen=True)
class Match:
    """A context match: ``tokens`` followed the last ``length`` tokens (pending one included)
    at an earlier place of the text (``where`` is "text" or "suffix")."""

    length: int
    tokens: tuple[int, ...]
    where: str


class ContextDrafter:
    """Prompt-lookup drafting over the prompt, the generated tokens and the suffix.

    An index maps every n-gram (n = 1..``max_ngram``) of the text to where
    its latest occurrence ends, and every n-gram of the suffix to where its
    first occurrence ends (the text right after the cursor matters most). The
    index grows by ``max_ngram`` entries per accepted token; a lookup is
    ``max_ngram`` dictionary probes, then the match is measured backwards (up
    to ``max_extend`` tokens), since a longer agreement predicts a longer
    copy.

    The prompt's index is kept from one generation to the next, like the KV
    cache: an editor re-sends the file with a keystroke's difference at its
    end, so ``begin`` rewinds the index over the tokens that changed (at most
    ``max_rewind``; each n-gram whose latest occurrence was among them gets its
    latest earlier one back) and adds the new ones, giving exactly the index a
    fresh build would. What a generation commits lives in an overlay that the
    next ``begin`` drops.
    """

    max_ngram = 4
    max_extend = 16
    max_rewind = 64

    def __init__(self, max_draft: int = 16) -> None:
        self.max_draft = max_draft
        self._prompt: list[int] = []
        self._prompt_ids = np.zeros(0, dtype=np.int64)
        self._base: dict[tuple[int, ...], int] = {}  # the prompt's n-grams
        self._overlay: dict[tuple[int, ...], int] = {}  # n-grams ending in committed tokens (later: they win)
        self._text: list[int] = []
        self._suffix: list[int] = []
        self._suffix_index: dict[tuple[int, ...], int] = {}

    def begin(self, prompt: Sequence[int], suffix: Sequence[int] = ()) -> None:
        """Start a generation: index the prompt (reusing the previous prompt's index) and the suffix."""
        new = [int(t) for t in prompt]
        old = self._prompt
        new_ids = np.asarray(new, dtype=np.int64)
        common = min(len(old), len(new))
        differ = np.flatnonzero(self._prompt_ids[:common] != new_ids[:common])
        keep = int(differ[0]) if differ.size else common
        if old and keep >= self.max_ngram and len(old) - keep <= self.max_rewind:
            self._rewind(keep)
            self._record(self._base, new, keep)
        else:
            self._base = self._build(new, latest=True)
        self._prompt = new
        self._prompt_ids = new_ids
        self._text = list(new)
        self._overlay = {}
        suffix_ids = [int(t) for t in suffix]
        if suffix_ids != self._suffix or not self._suffix_index:
            self._suffix = suffix_ids
            self._suffix_index = self._build(suffix_ids, latest=False)

    def _rewind(self, keep: int) -> None:
        """Drop from the prompt's index the n-grams followed by a token at ``keep`` or later."""
        old, base = self._prompt, self._base
        kept = self._prompt_ids[:keep]
        for end in range(keep, len(old)):
            for n in range(1, min(self.max_ngram, end) + 1):
                key = tuple(old[end - n: end])
                if base.get(key) != end:
                    continue
                earlier = _latest_end(kept, key)
                if earlier is None:
                    del base[key]
                else:
                    base[key] = earlier

    def _record(self, index: dict[tuple[int, ...], int], seq: list[int], start: int) -> None:
        """Record in ``index`` the n-grams of ``seq`` followed by a token at ``start`` or later
        (later ends overwrite earlier ones: the latest occurrence wins)."""
        for end in range(max(start, 1), len(seq)):
            for n in range(1, min(self.max_ngram, end) + 1):
                index[tuple(seq[end - n: end])] = end

    def _text_end(self, key: tuple[int, ...]) -> int | None:
        """Where the latest occurrence of ``key`` in the text ends (it is followed by a token there)."""
        end = self._overlay.get(key)
        return self._base.get(key) if end is None else end

    def _build(self, seq: list[int], latest: bool) -> dict[tuple[int, ...], int]:
        """n-gram -> end of its latest (or first) occurrence, for n-grams followed by a token.

        Built from zipped slices: a dict keeps the last value given for a key,
        so the iteration order decides latest or first, at C speed.
        """
        index: dict[tuple[int, ...], int] = {}
        size = len(seq)
        for n in range(1, self.max_ngram + 1):
            if size <= n:
                break
            ends = range(n, size)  # the n-gram seq[end-n:end] is followed by seq[end]
            grams = zip(*(seq[i: size - n + i] for i in range(n)))
            pairs = zip(grams, ends)
            index.update(pairs if latest else reversed(list(pairs)))  # (n-grams of each n are distinct keys)
        return index

    def accept(self, tokens: Sequence[int]) -> None:
        """Tokens committed to the text (the verified pending token and accepted drafts)."""
        start = len(self._text)
        self._text.extend(int(t) for t in tokens)
        # n-grams ending just before each new token are now followed by it
        self._record(self._overlay, self._text, start)

    def draft(self, pending: int) -> Match | None:
        """The best match for the text followed by ``pending``, or None.

        The longer match wins; on a tie the suffix wins, then the text.
        """
        text = self._text
        best: Match | None = None
        sources = (("suffix", self._suffix, self._suffix_index.get, bool(self._suffix_index)),
                   ("text", text, self._text_end, bool(self._base or self._overlay)))
        for where, seq, lookup, indexed in sources:
            if not indexed:
                continue
            for n in range(min(self.max_ngram, len(text) + 1), 0, -1):
                key = (*text[len(text) - n + 1:], pending) if n > 1 else (pending,)
                end = lookup(key)
                if end is None:
                    continue
                length = n + self._extend(seq, end - n, where == "text", n)
                if best is None or length > best.length:
                    tokens = self._continue(pending, end) if where == "text" else tuple(seq[end: end + self.max_draft])
                    best = Match(length, tokens, where)
                break
        return best

    def _continue(self, pending: int, end: int) -> tuple[int, ...]:
        """The ``max_draft`` tokens after a match in the text that ends at ``end``.

        Where the continuation reaches the end of the text it goes on with the
        pending token and then with itself: a match one period back in a
        repeating stretch (a loop, a run of similar lines) drafts the repetition
        in full, not only up to the text's end.
        """
        text = self._text
        n_text = len(text)
        out = text[end: end + self.max_draft]
        if len(out) < self.max_draft:
            out.append(pending)
            while len(out) < self.max_draft:
                out.append(out[end + len(out) - n_text - 1])
        return tuple(out)

    def _extend(self, seq: list[int], start: int, same: bool, n: int) -> int:
        """How many more tokens before the matched n-gram agree with the text before its last n-1 tokens."""
        text = self._text
        i = len(text) - n  # text[i] precedes the key's first token (the key ends with the pending token)
        j = start - 1
        extra = 0
        while extra < self.max_extend and i >= 0 and j >= 0 and (not same or j < i) and seq[j] == text[i]:
            extra += 1
            i -= 1
            j -= 1
        return extra

    @property
    def text(self) -> list[int]:
        """The indexed text (prompt and committed tokens)."""
        return self._text


# ---------------------------------------------------------------------------
# the head drafter


class HeadState(Protocol):
    """What the head drafter needs from the engine's KV state."""

    def feed_head(self, k: int) -> float:
        """Bring head k up to date with the trunk rows; seconds in llama.cpp."""
        ...

    def head_logits(self, k: int) -> np.ndarray:
        """Head k's logits at the last evaluated row."""
        ...

    def head_lag(self, k: int) -> int:
        """Trunk rows head k has not been fed yet."""
        ...


class HeadDrafter:
    """The MTP heads: head k (0-based) drafts slot k, the token k + 1 positions after the pending one.

    Greedy decoding drafts each head's argmax; sampling draws from the head's
    warped distribution, which is kept in ``q[k]`` for the acceptance test.
    """

    def __init__(self, kv: HeadState, n_heads: int, warper: sampling.Warper | None = None,
                 rng: np.random.Generator | None = None) -> None:
        self.kv = kv
        self.n_heads = n_heads
        self.warper = warper
        self.rng = rng
        self.q = [warper.new_buffer() for _ in range(n_heads)] if warper is not None else []

    def begin(self) -> None:
        """Feed every head the prompt's trunk rows (so the first draft costs one row per head)."""
        for k in range(self.n_heads):
            self.kv.feed_head(k)

    def draft(self, first: int, last: int, out: np.ndarray) -> tuple[float, bool]:
        """Heads ``first..last-1`` write their drafts into ``out[first:last]``.

        Returns (seconds in llama.cpp, whether the timing is typical of a draft:
        False when a head had more rows to catch up on than a step adds).
        """
        native = 0.0
        typical = True
        for k in range(first, last):
            typical = typical and self.kv.head_lag(k) <= self.n_heads + 1
            native += self.kv.feed_head(k)
            logits = self.kv.head_logits(k)
            if self.warper is None or self.rng is None:
                out[k] = sampling.greedy(logits)
            else:
                out[k] = sampling.sample(self.warper.probs(logits, self.q[k]), self.rng)
        return native, typical

    def accept(self, n: int) -> None:
        """Nothing to do: the heads are fed the kept rows at the next draft (they never need a rollback)."""


# ---------------------------------------------------------------------------
# the policy


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

    @property
    def kind(self) -> str:
        if self.context and self.heads > self.context:
            return CONTEXT_HEADS
        if self.context:
            return CONTEXT
        return HEADS if self.heads else PLAIN


def match_bucket(length: int, where: str = "text", hit: bool = False) -> int:
    """Acceptance-estimate bucket of a context match of ``length`` tokens found in the text or the
    suffix, after a step where the context's prediction was right (``hit``) or not: 0..6 by length
    (1, 2, 3, 4, 5-7, 8-15, 16+), plus 7 for the suffix (a copy of the text after the cursor and a
    repetition of the text before it are accepted at different rates), plus 14 after a hit (copying
    goes on in runs: a prediction that was just right is likelier to be right again)."""
    if length <= 4:
        bucket = max(length, 1) - 1
    else:
        bucket = 4 if length < 8 else 5 if length < 16 else 6
    return bucket + (len(CONTEXT_PRIOR) if where == "suffix" else 0) + (N_BUCKETS // 2 if hit else 0)


# Prior probability that the first token of a context draft is accepted, per
# match bucket (1, 2, 3, 4, 5-7, 8-15, 16+ tokens): optimistic enough that
# each bucket gets tried, so that measurements replace it.
CONTEXT_PRIOR = (0.3, 0.45, 0.55, 0.65, 0.75, 0.85, 0.9)
N_BUCKETS = 4 * len(CONTEXT_PRIOR)  # lengths x (text, suffix) x (after a miss, after a hit)
# after a miss the prior is lower
BUCKET_PRIOR = tuple(p * 0.6 for p in CONTEXT_PRIOR) * 2 + CONTEXT_PRIOR * 2


class DraftPolicy:
    """Chooses what each step drafts: how many heads, and whether and how far to draft from the context.

    Heads: tracks, per head k, a running estimate c_k of the probability
    that drafts d_1..d_k are all accepted (so a verify of K drafts yields
    1 + sum c_k tokens on average) and running timings of a main forward of
    b rows and of one head forward. Picks the K with the most expected tokens
    per second. Now and then it tries K+1 or K-1 (a probe) to keep the
    estimates of the neighbours fresh. A probe is not free (the neighbour may
    be slower, and on llama.cpp a new batch shape rebuilds the compute graph,
    also for the step after it), so while probes keep confirming the choice
    the interval between them doubles, from ``probe_min`` up to
    ``probe_max`` steps; it drops back to ``probe_min`` as soon as the choice
    changes or a probe yields more tokens per second than the choice is
    expected to.

    Context: for a match in a given bucket (:func:`match_bucket`: its length,
    its source, whether the context's last prediction was right) it keeps,
    per draft position i, the running probability that the i-th context token
    is accepted when the ones before it were; positions never tried take the
    estimate of the position before them. Every step with a match updates the
    first position's estimate, drafted or not (:meth:`after_step`). The draft
    length L maximises (1 + expected accepted) / (verify time of L + 1 rows).
    A context draft whose continuation ends before the heads' best draft
    length is extended by the heads, with its own acceptance estimates for
    those positions. The step takes the context plan when its expected rate
    beats the heads' choice by ``switch_margin``.

    It never changes *which* tokens come out under greedy decoding (only how
    many are verified per forward).

    ``measured=False`` replaces the measured timings by a fixed cost model (a
    forward of b rows costs 0.7 + 0.3 b, a head 0.05, in units of a one-row
    forward). Seeded sampling uses it: with measured
    timings the number of drafts, hence the random draws, would depend on
    machine noise and the same seed would not give the same text.
    """

    alpha = 0.1  # weight of a new observation in the running estimates
    ctx_weight = 2  # observations the prior of a context position is worth
    ctx_memory = 4  # observations of earlier generations a context estimate keeps at a new one
    # A context draft must promise this much more than the heads' choice: what the cost table leaves
    # out (the Python of a longer step, llama.cpp rebuilding its graph for the new batch shape and
    # back) and the optimism of choosing by estimates (the best-looking option is the likeliest to
    # be overestimated) are paid by every draft.
    switch_margin = 1.15
    probe_min = 16
    probe_max = 512
    probe_after_win = 4  # steps to the next probe after one that beat the choice
    # First steps: plain (the cost of a 1-row forward, and no loss), then one
    # head (its acceptance, the cost of 2 rows). More heads are tried when the
    # estimates say they would pay: the prior on heads not yet seen is optimistic.
    warmup = (0, 0, 1, 1, 1, 1)

    def __init__(self, max_heads: int, adaptive: bool, measured: bool = True, max_draft: int = 16,
                 flash_attn: bool = False) -> None:
        self.max_heads = max_heads
        self.flash_attn = flash_attn  # for the prior shape of unmeasured verify sizes
        self.n_cached = 0  # tokens in the KV cache at the current step (verify costs grow with it)
        self.adaptive = adaptive and max_heads > 0
        self.measured = measured
        self.max_draft = max(max_draft, max_heads)
        self.chain = [0.6 ** (k + 1) for k in range(max_heads)]  # optimistic prior (floats: called every step)
        self.seen = [0] * max_heads  # drafts of each head observed
        self.t_verify: dict[int, float] = {}
        # llama.cpp reuses its compute graph while the batch shape stays the same and rebuilds it
        # when the shape changes: a verify makes the next one-row step rebuild it again. That extra
        # time (a running estimate) is charged to the verify, not to the steps.
        self.t_switch = 0.0
        self._last_rows = 1
        self._costs: list[float] | None = None  # _cost_table() of the current measurements
        self._costs_at = -1  # the context bucket (n_cached // 256) the table was made for
        self._prior: list[float] = []
        self._prior_key: tuple[int, bool] | None = None
        self.t_head = 0.0
        self.k = max_heads
        self.steps = 0
        self.probes = 0
        self.probe_interval = self.probe_min
        self.warmup_steps = len(self.warmup) if self.adaptive else 2
        self._next_probe = self.warmup_steps + self.probe_min
        self._confirm: int | None = None  # a probe that won, to repeat at the next probe
        # context drafts: conditional acceptance per match bucket and position, and how often seen
        n_buckets = N_BUCKETS
        self.ctx_q = [[p] * self.max_draft for p in BUCKET_PRIOR]
        self.ctx_n = [[0] * self.max_draft for _ in range(n_buckets)]
        self.recent_hit = False  # whether the context's last prediction was right
        # heads after a context continuation: conditional acceptance per position (prior: the heads' own)
        self.mix_q = [0.0] * self.max_draft
        self.mix_n = [0] * self.max_draft

    # -- heads ------------------------------------------------------------

    def choose(self) -> int:
        """Heads to draft with this step (warm-up, the best rate, or a probe)."""
        self.steps += 1
        if not self.adaptive:
            return self.max_heads
        if self.steps <= self.warmup_steps or (self.measured and not self.t_verify):
            # (no timing yet after the warm-up: steps interrupted between choose and observe)
            return min(self.warmup[min(self.steps, self.warmup_steps) - 1], self.max_heads)
        best = max(range(self.max_heads + 1), key=self._rate)
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

    def _look_again_soon(self, steps: int | None = None) -> None:
        self.probe_interval = self.probe_min
        self._next_probe = min(self._next_probe, self.steps + (steps or self.probe_min))

    def _verify_time(self, rows: int) -> float:
        """What a step of ``rows`` rows costs: its forward and, for a verify, the graph rebuild
        it causes at the next one-row step."""
        if not self.measured:
            return 0.7 + 0.3 * rows
        costs = self._costs
        if costs is None or self._costs_at != self.n_cached >> 8:
            costs = self._costs = self._cost_table()
            self._costs_at = self.n_cached >> 8
        t = costs[rows] if rows <= self.max_draft + 1 else costs[-1]
        return t + self.t_switch if rows > 1 else t

    def _cost_table(self) -> list[float]:
        """Verify time per row count (index = rows), from the measurements, never decreasing.

        An unmeasured size scales the nearest measured one by the shape of a
        measured CPU cost table at the current context length
        (:func:`mtpcode.costs.verify_cost_prior`: on CPUs the second row is
        dear, the next ones cheap, and with flash attention every row pays the
        whole context again). A larger batch is never taken to cost less than a
        smaller one: on a shared machine one noisy measurement could otherwise
        make drafts look free.
        """
        prior = self._prior_shape()
        measured = self.t_verify
        sizes = sorted(measured)
        table = [0.0]
        j = 0  # sizes[j] is the nearest measured size at or below rows (or the smallest)
        for rows in range(1, self.max_draft + 2):
            t = measured.get(rows)
            if t is None:
                while j + 1 < len(sizes) and sizes[j + 1] <= rows:
                    j += 1
                ref = sizes[j]
                if j + 1 < len(sizes) and sizes[j + 1] - rows < abs(rows - ref):
                    ref = sizes[j + 1]
                t = measured[ref] * prior[rows] / prior[ref]
            table.append(max(t, table[-1]))
        return table

    def _prior_shape(self) -> list[float]:
        """The prior relative cost of 1..max_draft+1 rows at the current context length (index = rows)."""
        key = (self.n_cached // 256, self.flash_attn)
        if self._prior_key != key:
            from mtpcode.policy.prior import verify_cost_prior

            n = key[0] * 256 + 128
            self._prior = [1.0] + [verify_cost_prior(r, n, flash_attn=self.flash_attn)
                                   for r in range(1, self.max_draft + 2)]
            self._prior_key = key
        return self._prior

    def _head_time(self) -> float:
        return self.t_head if self.measured else 0.05

    def _rate(self, k: int) -> float:
        tokens = 1.0 + sum(self.chain[:k])
        return tokens / (self._verify_time(k + 1) + k * self._head_time())

    # -- context ----------------------------------------------------------

    def plan(self, match: Match | None, room: int, context: bool = True, n_cached: int | None = None) -> Plan:
        """This step's plan: the heads' choice (:meth:`choose`), replaced by a context draft
        (extended by heads when its continuation is short) when that is expected to pay more.
        ``room`` caps the drafts (context and output limits); ``n_cached`` is the context length."""
        if n_cached is not None:
            self.n_cached = n_cached
        k = min(self.choose(), room)
        in_warmup = self.steps <= self.warmup_steps or (self.measured and not self.t_verify)
        if match is None or not context or room < 1 or in_warmup or not match.tokens:
            return Plan(heads=k)
        if self.adaptive and k != self.k:  # a heads probe: let it run, its estimates need it
            return Plan(heads=k)
        bucket = match_bucket(match.length, match.where, self.recent_hit)
        available = min(len(match.tokens), room, self.max_draft)
        best_l, best_rate = self._best_context(bucket, available)
        plan, rate = Plan(heads=k), self._rate(k)
        if best_rate > self.switch_margin * rate:
            plan, rate = Plan(context=best_l), best_rate
        elif self.measured:
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

    def _unmeasured_size(self, bucket: int, available: int) -> int:
        """A draft length worth measuring: the best one if each extra row cost only a tenth of a
        1-row forward, when its size was never measured and it is expected to yield at least one
        more token. (Costs of unmeasured sizes come from another machine's table; where rows are
        cheaper than there, drafts would otherwise never be tried, hence never measured.)"""
        best_l, best_rate, tokens = 0, 1.0, 1.0
        for i, c in enumerate(self._ctx_chain(bucket, available)):
            tokens += c
            rate = tokens / (1.0 + 0.1 * (i + 1))
            if rate > best_rate:
                best_l, best_rate = i + 1, rate
        if best_l and best_l + 1 not in self.t_verify and tokens >= 2.0:
            return best_l
        return 0

    def _ctx_chain(self, bucket: int, n: int) -> list[float]:
        """P(context drafts 1..i all accepted), i = 1..n, for a match in ``bucket``."""
        qs, ns = self.ctx_q[bucket], self.ctx_n[bucket]
        out = []
        chain = 1.0
        q = qs[0]
        for i in range(n):
            q = qs[i] if ns[i] else q  # an untried position: the one before's estimate
            chain *= q
            out.append(chain)
        return out

    def _best_context(self, bucket: int, available: int) -> tuple[int, float]:
        """The context draft length with the most expected tokens per second, and that rate."""
        best_l, best_rate = 0, 0.0
        tokens = 1.0
        for i, c in enumerate(self._ctx_chain(bucket, available)):
            tokens += c
            rate = tokens / self._verify_time(i + 2)
            if rate > best_rate:
                best_l, best_rate = i + 1, rate
        return best_l, best_rate

    def _mixed_q(self, i: int) -> float:
        """Conditional acceptance of a head's draft at position i after a fully accepted context draft."""
        if self.mix_n[i]:
            return self.mix_q[i]
        # prior: the chance that the heads' drafts 1..i+1 are all right, which is at most the
        # conditional one (a ratio of two small estimates would be a noisy, optimistic prior)
        return self.chain[i] if i < self.max_heads else 0.0

    def _mixed_rate(self, bucket: int, n_context: int, heads: int) -> float:
        chain = self._ctx_chain(bucket, n_context)
        tokens = 1.0 + sum(chain)
        c = chain[-1] if chain else 1.0
        for i in range(n_context, heads):
            c *= self._mixed_q(i)
            tokens += c
        cost = self._verify_time(heads + 1) + (heads - n_context) * self._head_time()
        return tokens / cost

    # -- learning ---------------------------------------------------------

    def observe(self, k: int, accepted: int, verify_s: float, head_s: float, heads_run: int) -> None:
        """One heads-only step's outcome; ``heads_run`` 0 leaves the head timing alone (e.g. a head
        caught up on many rows, which says nothing about the cost of a draft)."""
        if self.adaptive and k != self.k and self.steps > self.warmup_steps:
            measured = verify_s + (self.t_switch if k else 0.0)
            cost = (measured if self.measured else self._verify_time(k + 1)) + k * self._head_time()
            if (1 + accepted) / cost > self._rate(self.k):  # a probe beat the choice:
                self._look_again_soon(self.probe_after_win)  # try it again soon
                self._confirm = k
        for i in range(k):  # a plain mean of the first observations, then a running one
            self.seen[i] += 1
            self.chain[i] += max(self.alpha, 1.0 / self.seen[i]) * (float(accepted > i) - self.chain[i])
        self._observe_costs(k + 1, verify_s, head_s, heads_run)

    def begin(self) -> None:
        """A new generation: what was learned of context drafts on earlier prompts counts as at most
        ``ctx_memory`` observations per position, so this prompt's own outcomes take over quickly
        (how much a text repeats itself is a property of the text; costs and heads carry over)."""
        for ns in self.ctx_n:
            for i, n in enumerate(ns):
                if n > self.ctx_memory:
                    ns[i] = self.ctx_memory
        self.recent_hit = False

    def after_step(self, match: Match | None, plan: Plan, first: int) -> None:
        """What the step produced after the pending token (``first``: the first accepted draft, or
        the main model's own token): whether the context predicted it. A step that did not draft
        from the context still tells, for free, whether the first token of a context draft would
        have been accepted; that observation goes to the estimates too."""
        if match is None or not match.tokens:
            self.recent_hit = False
            return
        hit = match.tokens[0] == first
        if not plan.context:
            bucket = match_bucket(match.length, match.where, self.recent_hit)
            qs, ns = self.ctx_q[bucket], self.ctx_n[bucket]
            ns[0] += 1
            qs[0] += max(self.alpha, 1.0 / (ns[0] + self.ctx_weight)) * (float(hit) - qs[0])
        self.recent_hit = hit

    def observe_plan(self, plan: Plan, match: Match | None, accepted: int, verify_s: float, head_s: float,
                     heads_run: int) -> None:
        """One step's outcome, for any plan (heads-only plans go to :meth:`observe`)."""
        if not plan.context or match is None:
            self.observe(plan.heads, accepted, verify_s, head_s, heads_run)
            return
        bucket = match_bucket(match.length, match.where, self.recent_hit)
        qs, ns = self.ctx_q[bucket], self.ctx_n[bucket]
        for i in range(min(accepted + 1, plan.context)):  # position i was tested: all before it were accepted
            if not ns[i] and i:  # first test of this position: start from the estimate it had (the one before's)
                qs[i] = next((qs[j] for j in range(i - 1, -1, -1) if ns[j]), qs[0])
            ns[i] += 1
            # the estimate so far counts as ``ctx_weight`` observations: one miss does not rule a position out
            qs[i] += max(self.alpha, 1.0 / (ns[i] + self.ctx_weight)) * (float(accepted > i) - qs[i])
        for i in range(plan.context, min(accepted + 1, plan.heads)):
            self.mix_n[i] += 1
            prior = self._mixed_q(i) if self.mix_n[i] == 1 else self.mix_q[i]
            self.mix_q[i] = prior + max(self.alpha, 1.0 / self.mix_n[i]) * (float(accepted > i) - prior)
        self._observe_costs(plan.rows, verify_s, head_s, heads_run)

    def _observe_costs(self, rows: int, verify_s: float, head_s: float, heads_run: int) -> None:
        a = self.alpha
        after_verify, self._last_rows = self._last_rows > 1, rows
        one = self.t_verify.get(1)
        if rows == 1 and after_verify and one is not None:
            # a step right after a verify: what it cost beyond a step is the verify's rebuild
            extra = max(0.0, verify_s - one)
            self.t_switch = extra if self.t_switch == 0.0 else self.t_switch + a * (extra - self.t_switch)
            return
        old = self.t_verify.get(rows)
        new = verify_s if old is None else old + a * (verify_s - old)
        self.t_verify[rows] = new
        if old is None or abs(new - old) > 0.02 * old:  # the table is rebuilt when an estimate moved
            self._costs = None
        if heads_run:
            per = head_s / heads_run
            self.t_head = per if self.t_head == 0.0 else self.t_head + a * (per - self.t_head)

    # -- persistence ------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What this policy learned (estimates, not its schedule), for :meth:`restore`."""
        return {"chain": list(self.chain), "seen": list(self.seen),
                "t_verify": {str(b): t for b, t in self.t_verify.items()}, "t_head": self.t_head,
                "t_switch": self.t_switch,
                "context": {"q": [list(q) for q in self.ctx_q], "n": [list(n) for n in self.ctx_n],
                            "mix_q": list(self.mix_q), "mix_n": list(self.mix_n)}}

    def restore(self, state: Any) -> bool:
        """Start from a :meth:`state` of an earlier run (no warm-up); False (and nothing
        changed) when ``state`` is not a valid state for this many heads. A state without
        context estimates (an older file) restores the rest."""
        try:
            chain = [float(c) for c in state["chain"]]
            seen = [int(n) for n in state["seen"]]
            t_verify = {int(b): float(t) for b, t in state["t_verify"].items()}
            t_head = float(state["t_head"])
            t_switch = float(state.get("t_switch", 0.0))
            ctx = state.get("context")
            if ctx is not None:
                cq = [[float(x) for x in q] for q in ctx["q"]]
                cn = [[int(x) for x in n] for n in ctx["n"]]
                mq = [float(x) for x in ctx["mix_q"]]
                mn = [int(x) for x in ctx["mix_n"]]
        except (KeyError, TypeError, ValueError, AttributeError):
            return False
        max_rows = self.max_draft + 1
        if (len(chain) != self.max_heads or len(seen) != self.max_heads or not t_verify
                or not all(0.0 <= c <= 1.0 for c in chain) or not all(n >= 0 for n in seen)
                or not all(1 <= b <= max_rows and 0.0 < t < 60.0 for b, t in t_verify.items())
                or not 0.0 <= t_head < 60.0 or not 0.0 <= t_switch < 60.0):
            return False
        if ctx is not None:
            shape_ok = (len(cq) == N_BUCKETS == len(cn)
                        and all(len(q) == self.max_draft for q in cq) and all(len(n) == self.max_draft for n in cn)
                        and len(mq) == self.max_draft == len(mn))
            values_ok = shape_ok and all(0.0 <= x <= 1.0 for q in cq for x in q) and all(0.0 <= x <= 1.0 for x in mq)
            if not values_ok:
                return False
            # saved estimates count as a few observations, so new ones move them soon
            self.ctx_q, self.ctx_n = cq, [[min(x, 5) for x in n] for n in cn]
            self.mix_q, self.mix_n = mq, [min(x, 5) for x in mn]
        self.chain, self.seen = chain, [min(n, 5) for n in seen]
        self.t_verify, self.t_head, self.t_switch = t_verify, t_head, t_switch
        self._costs = None
        self.steps = self.warmup_steps
        self._next_probe = self.steps + self.probe_min
        return True


def _latest_end(ids: np.ndarray, key: tuple[int, ...]) -> int | None:
    """Where the latest occurrence of ``key`` in ``ids`` that is followed by a token ends, or None."""
    n = len(key)
    starts = len(ids) - n  # windows ids[s:s+n] with s + n <= len(ids) - 1
    if starts <= 0:
        return None
    hit = ids[0:starts] == key[0]
    for i in range(1, n):
        hit &= ids[i: i + starts] == key[i]
    found = np.flatnonzero(hit)
    return int(found[-1]) + n if found.size else None
