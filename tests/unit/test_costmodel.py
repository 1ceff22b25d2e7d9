"""The cost models (mtpcode.bench.costmodel), the drafting policy's prior (mtpcode.policy.prior)
and the converter's quantization note, on fixed inputs with known answers."""

from __future__ import annotations

import json

import pytest

from mtpcode.bench import costmodel as C
from mtpcode.bench.synthetic import scale_depth
from mtpcode.cli.convert import quant_note
from mtpcode.policy.prior import verify_cost_prior

# --- least squares ------------------------------------------------------------------------------


def test_least_squares_recovers_a_line_and_nonnegative_pins_negative_coefficients():
    xs = [0.0, 1.0, 2.0, 3.0]
    assert C.least_squares([[1.0, x] for x in xs], [1 + 2 * x for x in xs]) == pytest.approx([1.0, 2.0])
    # y = 3 - x: the unconstrained slope is -1; with both >= 0 the best is a constant (the mean)
    ys = [3 - x for x in xs]
    assert C.least_squares([[1.0, x] for x in xs], ys) == pytest.approx([3.0, -1.0])
    assert C.nonnegative_least_squares([[1.0, x] for x in xs], ys) == pytest.approx([1.5, 0.0])
    with pytest.raises(ValueError, match="determine"):
        C.least_squares([[1.0, 2.0], [2.0, 4.0]], [1.0, 2.0])


# --- context length -----------------------------------------------------------------------------


def test_fit_context_costs_recovers_intercepts_and_slopes():
    truth = {1: (1e-3, 2e-6), 2: (1.5e-3, 2.2e-6), 4: (2e-3, 3e-6)}
    samples = [(b, n, c + n * s) for b, (c, s) in truth.items() for n in (64, 512, 2000)]
    fit = C.fit_context_costs(samples, "test")
    for b, (c, s) in truth.items():
        assert fit.intercept[b] == pytest.approx(c)
        assert fit.slope[b] == pytest.approx(s)
    assert fit.relative(1, 800) == 1.0
    assert fit.relative(2, 0) == pytest.approx(1.5)
    # 3 rows: halfway between the 2- and 4-row entries; 8 rows: the last segment continued
    assert fit.seconds(3, 0) == pytest.approx(1.75e-3)
    assert fit.seconds(8, 0) == pytest.approx(3e-3)
    assert json.loads(json.dumps(fit.to_dict()))["intercept_s"]["4"] == pytest.approx(2e-3)


def test_fit_context_costs_needs_two_context_lengths():
    with pytest.raises(ValueError, match="one context length"):
        C.fit_context_costs([(1, 64, 1e-3), (2, 64, 2e-3)])


def test_verify_cost_prior():
    assert verify_cost_prior(1, 1500) == pytest.approx(1.0)
    assert verify_cost_prior(1, 1500, flash_attn=True) == pytest.approx(1.0)
    for flash in (False, True):
        costs = [verify_cost_prior(b, 800, flash_attn=flash) for b in range(1, 9)]
        assert all(c >= 1.0 for c in costs) and costs[-1] > costs[0]
    # flash attention walks the cache once per row: long contexts make its verify dearer
    assert verify_cost_prior(8, 2000, flash_attn=True) > verify_cost_prior(8, 2000, flash_attn=False)
    with pytest.raises(ValueError):
        verify_cost_prior(0, 100)


# --- cores and bandwidth ------------------------------------------------------------------------


COMPUTE = {1: 0.250, 2: 0.300, 3: 0.450, 4: 0.400}  # one-core seconds; 4 rows cheaper than 3 (a 4-row kernel)


def test_fit_roofline_recovers_a_known_model():
    overhead = 0.002
    samples = [(b, t, overhead + c / t) for b, c in COMPUTE.items() for t in (1, 2)]
    fit = C.fit_roofline(samples, bytes_per_forward=4e9, head_bytes=2e8)
    m = fit.model
    assert fit.overhead_fitted and fit.dropped == []
    assert m.overhead_s == pytest.approx(overhead, abs=1e-4)
    for b, c in COMPUTE.items():
        assert m.compute_1core[b] == pytest.approx(c, abs=1e-4)
    assert fit.memory_here_s == 0.0 and fit.bandwidth_here_gb_s is None
    assert fit.max_abs_error < 1e-3 and len(fit.residuals) == 8
    # 8 cores, 40 GB/s: memory takes 0.1 s, compute at most 0.45 / 8: memory-bound at every row count
    assert m.memory_bound_rows(8, 40.0) == 4
    assert m.seconds(3, 8, 40.0) == pytest.approx(overhead + 0.1, abs=1e-4)
    assert m.head_seconds(8, 40.0) == pytest.approx((overhead + 0.1) * 0.05, abs=1e-5)
    # 2 cores: compute-bound; 3.5 rows lie between the 3- and 4-row entries
    assert m.seconds(3.5, 2, 40.0) == pytest.approx(m.overhead_s + (m.compute_1core[3] + m.compute_1core[4]) / 4)
    with pytest.raises(ValueError, match="one thread"):
        C.fit_roofline([(b, 2, 0.1 * b) for b in range(1, 5)], bytes_per_forward=1e9)


def test_fit_roofline_finds_the_memory_floor():
    # with 2 threads one row hits a floor of 0.14 s (weights streamed from memory); the rest is compute
    overhead, floor = 0.002, 0.140
    samples = [(b, t, overhead + max(floor if t > 1 else 0.0, c / t)) for b, c in COMPUTE.items() for t in (1, 2)]
    fit = C.fit_roofline(samples, bytes_per_forward=7e9)
    assert fit.model.overhead_s == pytest.approx(overhead, abs=2e-4)
    assert fit.memory_here_s == pytest.approx(floor, rel=0.02)
    assert fit.bandwidth_here_gb_s == pytest.approx(50.0, rel=0.02)
    assert fit.max_abs_error < 0.02
    # without the floor the same samples fit worse
    assert C.fit_roofline(samples, bytes_per_forward=7e9, memory_floor=False).max_abs_error > 0.05


def test_fit_roofline_drops_oversubscribed_samples():
    # on a loaded machine 2 threads ran slower than 1: those samples say nothing about cores
    samples = [(b, 1, c) for b, c in COMPUTE.items()] + [(b, 2, 10 * c) for b, c in COMPUTE.items()]
    fit = C.fit_roofline(samples, bytes_per_forward=4e9)
    assert len(fit.dropped) == 4 and not fit.overhead_fitted
    assert fit.model.overhead_s == 0.0 and fit.model.compute_1core == COMPUTE
    assert len(fit.residuals) == 4 and fit.max_abs_error == pytest.approx(0.0, abs=1e-9)


def test_geometric_acceptance_matches_the_paper_anchor():
    a = C.geometric_acceptance(3.5, 3)
    assert 1 + a + a * a + a ** 3 == pytest.approx(3.5, abs=1e-9)
    assert C.geometric_acceptance(10.0, 3) == pytest.approx(1.0)


def test_project_speedup_memory_bound_and_compute_bound():
    # memory-bound at every verified row count and free heads: the speedup is the tokens per forward
    m = C.Roofline(compute_1core={1: 0.01, 2: 0.02, 3: 0.03, 4: 0.04}, overhead_s=0.0, bytes_per_forward=1e9)
    pj = C.project_speedup(m, 1, 10.0, tokens_per_forward=3.5, n_drafts=3)
    assert pj["at_n"]["speedup"] == pytest.approx(3.5, abs=1e-3)
    assert pj["best"]["drafts"] == 3
    assert "PROJECTION" in pj["label"]
    # compute-bound: every row costs a full forward, drafting never pays
    pj = C.project_speedup(m, 1, None, tokens_per_forward=3.5, n_drafts=3)
    assert pj["best"]["drafts"] == 0 and pj["best"]["speedup"] == pytest.approx(1.0)
    assert pj["at_n"]["speedup"] == pytest.approx(3.5 / 4, abs=1e-3)


def test_desktop_targets_are_stated():
    assert [d.cores for d in C.DESKTOPS] == [8, 16]
    assert all(d.bandwidth_gb_s > 0 for d in C.DESKTOPS)


# --- quantization guidance ----------------------------------------------------------------------


def test_quant_note():
    note = quant_note("q4_k_m")
    assert note is not None and "Q4_K_M" in note and "Q8_0" in note and "\n" not in note
    assert quant_note("Q8_0") is None
    assert quant_note("Q4_0") is None
    assert quant_note("F16") is None  # not measured: no advice


# --- synthetic shapes ---------------------------------------------------------------------------


def test_scale_depth_is_linear_in_blocks():
    shallow = {2: {(1, 1): 0.03, (2, 1): 0.05}, 6: {(1, 1): 0.07, (2, 1): 0.13}}
    full = scale_depth(shallow, 29)
    assert full[(1, 1)] == pytest.approx(0.03 + 27 * 0.01)
    assert full[(2, 1)] == pytest.approx(0.05 + 27 * 0.02)
