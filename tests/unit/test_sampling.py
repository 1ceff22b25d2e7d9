"""mtpcode.sampling: warping, drawing, and the speculative-sampling rule."""

from __future__ import annotations

import numpy as np
import pytest

from mtpcode import sampling
from mtpcode.generation import SamplingOptions


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a - b).sum())


def test_greedy_takes_first_of_ties() -> None:
    assert sampling.greedy(np.array([0.1, 3.0, 3.0, -1.0], dtype=np.float32)) == 1


def test_warper_rejects_greedy_options() -> None:
    with pytest.raises(ValueError):
        sampling.Warper(4, SamplingOptions(temperature=0.0))


def test_temperature_only_is_softmax_of_scaled_logits() -> None:
    logits = np.array([1.0, 2.0, 0.5, -3.0], dtype=np.float32)
    w = sampling.Warper(4, SamplingOptions(temperature=0.7))
    p = w.probs(logits, w.new_buffer())
    np.testing.assert_allclose(p, _softmax(logits.astype(np.float64) / 0.7), rtol=1e-9)


def test_top_k_keeps_the_k_largest() -> None:
    logits = np.array([1.0, 5.0, 3.0, 4.0, 2.0], dtype=np.float32)
    w = sampling.Warper(5, SamplingOptions(temperature=1.0, top_k=2))
    p = w.probs(logits, w.new_buffer())
    assert np.flatnonzero(p).tolist() == [1, 3]
    np.testing.assert_allclose(p[[1, 3]], _softmax(np.array([5.0, 4.0])))


def test_top_p_keeps_smallest_nucleus_reaching_p() -> None:
    probs = np.array([0.05, 0.5, 0.3, 0.15])
    logits = np.log(probs).astype(np.float32)
    w = sampling.Warper(4, SamplingOptions(temperature=1.0, top_p=0.75))
    p = w.probs(logits, w.new_buffer())
    # 0.5 alone < 0.75; 0.5 + 0.3 reaches it
    assert np.flatnonzero(p).tolist() == [1, 2]
    np.testing.assert_allclose(p[[1, 2]], [0.5 / 0.8, 0.3 / 0.8], rtol=1e-5)
    # combined with top-k (the nucleus is taken within the top-k support)
    w = sampling.Warper(4, SamplingOptions(temperature=1.0, top_k=3, top_p=0.9))
    p = w.probs(logits, w.new_buffer())
    assert np.flatnonzero(p).tolist() == [1, 2, 3]


def test_min_p_drops_tokens_below_fraction_of_max() -> None:
    probs = np.array([0.05, 0.5, 0.3, 0.15])
    w = sampling.Warper(4, SamplingOptions(temperature=1.0, min_p=0.35))
    p = w.probs(np.log(probs).astype(np.float32), w.new_buffer())
    assert np.flatnonzero(p).tolist() == [1, 2]  # 0.15 < 0.35 * 0.5


def test_sample_follows_the_distribution_and_is_seeded() -> None:
    p = np.array([0.1, 0.0, 0.6, 0.3])
    rng = np.random.default_rng(1)
    draws = np.array([sampling.sample(p, rng) for _ in range(20000)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert freq[1] == 0.0
    assert _tv(freq, p) < 0.02
    a = [sampling.sample(p, np.random.default_rng(7)) for _ in range(5)]
    b = [sampling.sample(p, np.random.default_rng(7)) for _ in range(5)]
    assert a == b


def _speculative_draws(p: np.ndarray, q: np.ndarray, n: int, seed: int, wrong: str | None = None) -> np.ndarray:
    """Emitted tokens of one speculative position: draft from q, accept or replace."""
    rng = np.random.default_rng(seed)
    scratch = np.empty_like(p)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        d = sampling.sample(q, rng)
        if wrong == "always-accept":
            ok = True
        elif wrong == "swapped-ratio":  # min(1, q/p): a plausible slip
            ok = rng.random() * p[d] < q[d]
        else:
            ok = sampling.accept(p, q, d, rng)
        if ok:
            out[i] = d
        elif wrong == "resample-from-p":  # forgets the residual
            out[i] = sampling.sample(p, rng)
        else:
            out[i] = sampling.residual(p, q, rng, scratch)
    return out


P = np.array([0.05, 0.40, 0.05, 0.30, 0.20])
Q = np.array([0.30, 0.10, 0.30, 0.20, 0.10])
N = 30000
# TV between an empirical law of N draws on 5 symbols and the truth is ~0.006 on
# average; 0.02 is > 3x that, and every wrong rule below is >= 0.05 away.
BOUND = 0.02


def test_speculative_rule_reproduces_target_distribution() -> None:
    freq = np.bincount(_speculative_draws(P, Q, N, seed=3), minlength=5) / N
    assert _tv(freq, P) < BOUND


@pytest.mark.parametrize("wrong", ["always-accept", "swapped-ratio", "resample-from-p"])
def test_wrong_rules_fail_the_same_bound(wrong: str) -> None:
    freq = np.bincount(_speculative_draws(P, Q, N, seed=3, wrong=wrong), minlength=5) / N
    assert _tv(freq, P) > BOUND


def test_residual_when_p_equals_q_falls_back_to_p() -> None:
    p = np.array([0.2, 0.8])
    assert sampling.residual(p, p.copy(), np.random.default_rng(0), np.empty(2)) in (0, 1)


def test_top_p_candidate_shortcut_matches_a_full_sort() -> None:
    """The nucleus found among argpartition candidates equals the one from sorting everything."""
    rng = np.random.default_rng(5)
    for _ in range(200):
        logits = (rng.standard_normal(5000) * rng.choice([0.3, 1.0, 3.0, 10.0])).astype(np.float32)
        temp, top_p = float(rng.choice([0.5, 1.0, 2.0])), float(rng.choice([0.5, 0.9, 0.99]))
        x = logits.astype(np.float64) / temp
        p = _softmax(x)
        order = np.argsort(-p, kind="stable")
        n_keep = int(np.searchsorted(np.cumsum(p[order]), top_p, side="left")) + 1
        expect = np.zeros_like(p)
        expect[order[:n_keep]] = p[order[:n_keep]]
        expect /= expect.sum()
        w = sampling.Warper(5000, SamplingOptions(temperature=temp, top_p=top_p))
        got = w.probs(logits, w.new_buffer())
        assert np.array_equal(np.flatnonzero(got), np.flatnonzero(expect))
        np.testing.assert_allclose(got, expect, rtol=1e-9, atol=1e-15)
