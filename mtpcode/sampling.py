"""Token selection on numpy logits: greedy, warped sampling, and the
speculative-sampling acceptance rule.

Warping (the order is fixed and documented because the main model and the
draft heads must be warped by the *same* function for speculative sampling
to be exact):

1. divide the logits by ``temperature``;
2. top-k: keep the tokens whose logit is at least the k-th largest (ties at
   the boundary are all kept);
3. softmax;
4. top-p: keep the smallest set of most likely tokens whose total
   probability reaches ``top_p``;
5. min-p: drop tokens whose probability is below ``min_p`` times the
   largest probability;
6. renormalise.

Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): a draft token
``t ~ q`` is accepted with probability ``min(1, p[t] / q[t])``; on rejection
the replacement is drawn from ``norm(max(p - q, 0))``. The emitted token is
then distributed exactly as ``p``, whatever ``q`` is.
"""

from __future__ import annotations

import numpy as np

from mtpcode.generation import SamplingOptions


def new_seed() -> int:
    """A fresh random seed (reported in Stats so a run can be repeated)."""
    entropy = np.random.SeedSequence().entropy
    assert isinstance(entropy, int)  # a SeedSequence made without one draws an int from the OS
    return entropy % (2**32)


def greedy(logits: np.ndarray) -> int:
    """The most likely token (the first one on exact ties, like llama.cpp's greedy sampler)."""
    return int(logits.argmax())


class Warper:
    """Turns one row of logits into the sampling distribution for ``options``.

    The returned array is a buffer owned by the warper; ``probs(..., out=)``
    lets the caller keep several distributions alive at once (main and heads).
    """

    def __init__(self, n_vocab: int, options: SamplingOptions) -> None:
        if options.greedy:
            raise ValueError("Warper is for temperature > 0; use greedy() otherwise")
        self.n_vocab = n_vocab
        self.inv_temp = 1.0 / float(options.temperature)
        self.top_k = int(options.top_k) if 0 < options.top_k < n_vocab else 0
        self.top_p = float(options.top_p)
        self.min_p = float(options.min_p)
        self._x = np.empty(n_vocab, dtype=np.float64)

    def new_buffer(self) -> np.ndarray:
        return np.empty(self.n_vocab, dtype=np.float64)

    def probs(self, logits: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Write the warped distribution of ``logits`` into ``out`` and return it."""
        x = self._x
        np.copyto(x, logits)  # to float64 first: float32 * float would round in float32
        x *= self.inv_temp
        if self.top_k:
            kth = np.partition(x, self.n_vocab - self.top_k)[self.n_vocab - self.top_k]
            x[x < kth] = -np.inf
        np.subtract(x, x.max(), out=x)
        np.exp(x, out=out)
        out /= out.sum()
        if self.top_p < 1.0:
            self._apply_top_p(out)
        if self.min_p > 0.0:
            out[out < self.min_p * out.max()] = 0.0
        out /= out.sum()
        return out

    def _apply_top_p(self, p: np.ndarray) -> None:
        support = self._nucleus_candidates(p)
        cand = p[support]
        order = np.argsort(-cand, kind="stable")
        cum = np.cumsum(cand[order])
        # smallest prefix whose mass reaches top_p (the token crossing it is kept)
        n_keep = int(np.searchsorted(cum, self.top_p * p.sum(), side="left")) + 1
        keep = support[order[:n_keep]]
        kept = p[keep]
        p[:] = 0.0
        p[keep] = kept

    def _nucleus_candidates(self, p: np.ndarray) -> np.ndarray:
        """Indices (ascending) of a set of most likely tokens that surely holds the nucleus.

        Sorting the whole vocabulary costs milliseconds per row; the nucleus
        usually lies within the few hundred most likely tokens, which
        ``argpartition`` finds in linear time. Ascending indices keep the
        stable sort's tie order.
        """
        if self.top_k:
            return np.flatnonzero(p)
        n = len(p)
        target = self.top_p * p.sum()
        m = 256
        while m < n:
            top = np.argpartition(p, n - m)[n - m:]
            if p[top].sum() >= target:
                return np.sort(top)
            m *= 4
        return np.arange(n)


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token from the (normalised or not) nonnegative weights ``p``."""
    cum = np.cumsum(p)
    total = cum[-1]
    i = int(np.searchsorted(cum, rng.random() * total, side="right"))
    if i >= len(p) or p[i] <= 0.0:
        # float round-off at the very top of the cumulative sum
        i = int(np.flatnonzero(p)[-1])
    return i


def accept(p: np.ndarray, q: np.ndarray, token: int, rng: np.random.Generator) -> bool:
    """Speculative-sampling test for a draft ``token`` drawn from ``q``: True with prob min(1, p/q)."""
    qt = q[token]
    if qt <= 0.0:
        return False
    return rng.random() * qt < p[token]


def residual(p: np.ndarray, q: np.ndarray, rng: np.random.Generator, scratch: np.ndarray) -> int:
    """Replacement token after a rejection: a draw from norm(max(p - q, 0))."""
    np.subtract(p, q, out=scratch)
    np.maximum(scratch, 0.0, out=scratch)
    if scratch.sum() <= 0.0:
        # p == q up to round-off: a rejection is (almost) impossible; p is the right law.
        return sample(p, rng)
    return sample(scratch, rng)


def accept_deterministic(p: np.ndarray, token: int, rng: np.random.Generator) -> bool:
    """The test for a draft that was not drawn (``q`` one-hot on ``token``): True with probability p[token].

    The same draw as :func:`accept` with a one-hot ``q``.
    """
    return rng.random() < p[token]


def residual_deterministic(p: np.ndarray, token: int, rng: np.random.Generator, scratch: np.ndarray) -> int:
    """Replacement after rejecting a deterministic draft: a draw from ``p`` without ``token``
    (:func:`residual` with a one-hot ``q``: ``max(p - q, 0)`` is ``p`` with ``token`` removed)."""
    np.copyto(scratch, p)
    scratch[token] = 0.0
    if scratch.sum() <= 0.0:
        return sample(p, rng)
    return sample(scratch, rng)
