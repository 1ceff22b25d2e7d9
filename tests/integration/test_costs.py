"""The cost models (mtpcode.costs) on fixed inputs with known answers, the converter's
quantization note, and the cost measurements on real llama.cpp with tiny models (shapes
and sanity only: speed is measured by benchmarks, never asserted in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mtpcode import costs as C


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "mtpcode", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


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
    assert C.verify_cost_prior(1, 1500) == pytest.approx(1.0)
    assert C.verify_cost_prior(1, 1500, flash_attn=True) == pytest.approx(1.0)
    for flash in (False, True):
        costs = [C.verify_cost_prior(b, 800, flash_attn=flash) for b in range(1, 9)]
        assert all(c >= 1.0 for c in costs) and costs[-1] > costs[0]
    # flash attention walks the cache once per row: long contexts make its verify dearer
    assert C.verify_cost_prior(8, 2000, flash_attn=True) > C.verify_cost_prior(8, 2000, flash_attn=False)
    with pytest.raises(ValueError):
        C.verify_cost_prior(0, 100)


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
    note = C.quant_note("q4_k_m")
    assert note is not None and "Q4_K_M" in note and "Q8_0" in note and "\n" not in note
    assert C.quant_note("Q8_0") is None
    assert C.quant_note("Q4_0") is None
    assert C.quant_note("F16") is None  # not measured: no advice


@pytest.mark.parametrize("quant,noted", [("Q4_K_M", True), ("Q8_0", False)])
def test_convert_notes_a_type_that_verifies_badly(make_checkpoint, tmp_path, quant, noted):
    src, _ = make_checkpoint()
    proc = run_cli("convert", str(src), "--out", str(tmp_path / "b"), "--quant", quant, "--no-register")
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    if noted:
        assert len(notes) == 1 and "verifies drafts slowly on CPU" in notes[0]
        assert "--quant Q4_0" in notes[0] and "--quant Q8_0" in notes[0]
    else:
        assert notes == []
    assert (tmp_path / "b" / "main.gguf").is_file()


# --- measurements on real llama.cpp (shapes, no timings) ----------------------------------------


def test_scale_depth_is_linear_in_blocks():
    from mtpcode.bench.synthetic import scale_depth

    shallow = {2: {(1, 1): 0.03, (2, 1): 0.05}, 6: {(1, 1): 0.07, (2, 1): 0.13}}
    full = scale_depth(shallow, 29)
    assert full[(1, 1)] == pytest.approx(0.03 + 27 * 0.01)
    assert full[(2, 1)] == pytest.approx(0.05 + 27 * 0.02)


def test_forward_bytes_match_the_written_files(tmp_path):
    from mtpcode.bench.run import bytes_per_forward
    from mtpcode.bench.synthetic import build_bundle, forward_bytes

    for quant in ("Q8_0", "Q4_0"):
        bundle = build_bundle("tiny", quant, tmp_path, n_heads=1, trunk_blocks=1)
        main, head = forward_bytes("tiny", quant, trunk_blocks=1)
        assert main == bytes_per_forward(bundle / "main.gguf", embd_input=False)
        assert head == bytes_per_forward(bundle / "head-1.gguf", embd_input=True)
    full_main, _ = forward_bytes("tiny", "Q8_0")
    assert full_main > main  # the full tiny shape has more blocks


def test_measure_context_costs_on_the_tiny_bundle(tiny_bundle):
    from mtpcode.bench.synthetic import context_table, measure_context_costs

    doc = measure_context_costs(tiny_bundle, contexts=(40, 8), rows=(3, 2), flash=(False, True), threads=(1,),
                                repeat=1, text="def f(x):\n    return x + 1\n")
    assert doc["contexts"] == [8, 40] and doc["rows"] == [1, 2, 3]
    assert len(doc["cells"]) == 4
    for cell in doc["cells"]:
        assert set(cell["seconds"]) == {"1", "2", "3"}
        assert all(s > 0 for s in cell["seconds"].values())
        assert cell["rel"]["1"] == 1.0 and cell["rel"]["3"] > 0
        assert all(s > 0 for s in cell["cpu_seconds"].values()) and cell["cpu_rel"]["1"] == 1.0
        assert cell["n_samples"]["2"] == 1
    assert set(doc["fits"]) == {"fa0-t1", "fa1-t1"}
    fit = doc["fits"]["fa0-t1"]
    assert set(fit["intercept_s"]) == {"1", "2", "3"}
    assert all(v >= 0 for v in fit["slope_s_per_token"].values())
    table = context_table(doc)
    assert table.count("\n") == 1 + 4 and "| off | 1 | 8 | CPU |" in table


def test_bench_project_cli_on_the_tiny_shape(tmp_path):
    proc = run_cli("bench", "--synthetic", "tiny", "--project", "--quant", "Q8_0", "--max-batch", "3",
                   "--repeat", "3", "--threads", "2", "--buffers", "off", "--json", "-", "-q",
                   env={"MTPCODE_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["kind"] == "projection" and "PROJECTION" in doc["label"]
    assert doc["threads"] == [1, 2] and doc["mode"] == "off"
    (r,) = doc["results"]
    assert not r.get("crashed"), r
    # cells disturbed by other programs are left out and listed, never silently lost
    cells = {f"{b}x{t}" for b in (1, 2, 3) for t in (1, 2)}
    assert set(r["scaled_seconds"]) | set(r["unusable_cells"]) == cells
    assert {"1x1", "2x1", "3x1"} <= set(r["scaled_seconds"])
    assert r["measured_depth_blocks"] == [2, 6] and r["full_depth_blocks"] == 3
    assert len(r["fit_residuals"]) + len(r["fit_dropped"]) == len(r["scaled_seconds"])
    assert set(r["fit"]["compute_1core_s"]) == {"1", "2", "3"}
    names = [p["machine"]["name"] for p in r["projections"]]
    assert names[1:] == ["8-core desktop", "16-core desktop"]
    for pj in r["projections"]:
        assert [k["drafts"] for k in pj["per_k"]] == [0, 1, 2]
        assert pj["best"]["speedup"] >= 1.0 - 1e-9  # zero drafts is always an option
    assert doc["assumptions"] and doc["memory_bandwidth"]["best_gb_s"] > 0


def test_bench_project_refuses_a_plot(tmp_path):
    proc = run_cli("bench", "--synthetic", "tiny", "--project", "--plot", str(tmp_path / "x.svg"), "-q",
                   env={"MTPCODE_CACHE_DIR": str(tmp_path)})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "--plot" in proc.stderr.strip().splitlines()[-1]
    assert not Path(tmp_path / "x.svg").exists()
