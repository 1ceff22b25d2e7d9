"""The converter's quantization note on a real conversion, and the cost measurements on real
llama.cpp with tiny models (shapes and sanity only: speed is measured by benchmarks, never
asserted in tests). The cost models' arithmetic is in tests/unit/test_costmodel.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "mtpcode", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


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


def test_forward_bytes_match_the_written_files(tmp_path):
    from mtpcode.bench.measure import bytes_per_forward
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
