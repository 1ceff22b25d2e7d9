"""``mtpcode bench`` on tiny real bundles, and the synthetic cost model on a tiny shape.

No timing assertions: the machine is shared and noisy. What must hold is
checked: the JSON has its fields, greedy output is identical across head
counts, measured numbers are positive and consistent with each other.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from runtime_helpers import agreeing_checkpoint

from mtpcode.cli import main


@pytest.fixture(scope="module")
def agreeing_bundle(tmp_path_factory, make_checkpoint) -> Path:
    """A tiny F32 bundle whose heads agree with the main model often (acceptance > 0)."""
    from converters.convert import convert_checkpoint

    ckpt, _ = make_checkpoint()
    root = tmp_path_factory.mktemp("bench")
    agree = agreeing_checkpoint(ckpt, root / "ckpt-agree")
    out = root / "agree-f32"
    convert_checkpoint(agree, out, quant="F32", threads=2)
    return out


@pytest.fixture
def prompts_dir(tmp_path) -> Path:
    d = tmp_path / "prompts"
    d.mkdir()
    (d / "a.py").write_text("def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n", encoding="utf-8")
    (d / "b.py").write_text("import os\n\nclass Path:\n    def __init__(self, p):\n", encoding="utf-8")
    return d


def _bench(args: list[str]) -> tuple[int, str, str]:
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    result = runner.invoke(main, ["bench", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, getattr(result, "stderr", "")


def test_bench_json_fields_and_identical_greedy_output(agreeing_bundle, prompts_dir, tmp_path):
    out = tmp_path / "bench.json"
    plot = tmp_path / "bench.svg"
    code, stdout, stderr = _bench(["--model", str(agreeing_bundle), "--prompts", str(prompts_dir), "-n", "24",
                                   "--repeat", "2", "--threads", "2", "--ctx", "256", "--json", str(out),
                                   "--plot", str(plot), "-q"])
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    assert doc["schema"] == "mtpcode-bench/2"
    assert doc["configs"] == ["plain", "plain-again", "1 head", "2 heads", "3 heads", "context", "3 heads + context",
                              "llama.cpp"]
    assert doc["greedy_identical"] is True and doc["mismatches"] == []
    assert [p["name"] for p in doc["prompts"]] == ["a.py", "b.py"]
    ceiling = doc["context_ceiling"]  # the oracle never loses: it steps plainly where drafts do not pay
    assert [c["prompt"] for c in ceiling["per_prompt"]] == ["a.py", "b.py"]
    assert ceiling["min_speedup"] >= 1.0 and 0.0 <= ceiling["median_copied"] <= 1.0
    assert set(doc["forward_costs"]["verify_s"]) == {str(b) for b in range(1, 18)}  # up to the longest draft
    assert doc["forward_costs"]["rebuild_s"] >= 0.0
    assert "ceiling of drafting from the context" in stdout
    # every configuration ran on every prompt, every repetition
    assert len(doc["runs"]) == 2 * 2 * 8
    for p in doc["prompts"]:
        assert p["generated_tokens"] > 0
        for config, c in p["configs"].items():
            assert c["decode_tokens_per_s"] > 0
            assert c["speedup"] > 0 and c["speedup_cpu"] > 0
            # CPU time of the decoding thread never exceeds its wall-clock time (rates: the other way round)
            assert c["decode_tokens_per_cpu_s"] >= 0.99 * c["decode_tokens_per_s"]
            assert c["peak_rss_mb"] > 0
            spec = doc["config_specs"][config]
            if spec["heads"]:
                assert len(c["acceptance"]) == spec["heads"]
                assert all(0.0 <= a <= 1.0 for a in c["acceptance"])
            if spec["heads"] or spec["context"]:
                assert c["python_ms_per_step"] >= 0 and c["native_ms_per_step"] > 0
                # every forward is of one kind of step; drafts only from the sources the configuration has
                assert sum(c["forwards_by_source"].values()) == sum(
                    r["stats"]["main_forwards"] for r in doc["runs"] if r["config"] == config
                    and doc["prompts"][r["prompt"]]["name"] == p["name"])
                if not spec["context"]:
                    assert c["drafted_by_source"]["context"] == 0
                if not spec["heads"]:
                    assert c["drafted_by_source"]["heads"] == 0
        assert p["configs"]["plain"]["tokens_per_forward"] == pytest.approx(1.0, abs=0.05)
    s = doc["summary"]
    # the agreeing heads are accepted sometimes: more than one token per forward with drafting
    assert s["3 heads"]["tokens_per_forward"] > 1.0
    assert s["plain"]["median_speedup"] == pytest.approx(1.0) and s["plain"]["median_speedup_cpu"] == pytest.approx(1.0)
    assert doc["memory"]["peak_rss_mb"] >= doc["memory"]["rss_after_engine_load_mb"] > 0
    a = doc["anchors"]
    assert a["memory_bandwidth"]["best_gb_s"] > 0
    assert a["main_bytes_per_forward"] > 0 and a["plain_tokens_per_s_bound"] > 0
    assert a["paper_table_s2_code_4_heads"] == {"speedup": 3.05, "tokens_per_forward": 3.5}
    assert doc["conditions"]["threads"] == doc["conditions"]["threads_batch"] == 2  # --threads alone sets both
    # the terminal table names every prompt; the plot is an SVG document
    assert "a.py" in stdout and "plain" in stdout
    assert plot.read_text().startswith("<svg")


def test_bench_plain_and_speculative_agree_with_llama_on_random_model(tiny_bundle, prompts_dir, tmp_path):
    # random heads: drafts are almost never accepted, output must still be identical
    out = tmp_path / "b.json"
    code, _, stderr = _bench(["--model", str(tiny_bundle), "--prompts", str(prompts_dir / "a.py"), "-n", "16",
                              "--repeat", "1", "--heads", "3", "--threads", "2", "--ctx", "128",
                              "--json", str(out), "-q"])
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    assert doc["configs"] == ["plain", "plain-again", "3 heads", "context", "3 heads + context", "llama.cpp"]
    assert doc["greedy_identical"]


def test_bench_rejects_bad_arguments(tiny_bundle, prompts_dir, tmp_path):
    code, _, stderr = _bench(["--model", str(tiny_bundle), "--prompts", str(prompts_dir), "--plot",
                              str(tmp_path / "x.png")])
    assert code == 2 and "svg" in stderr.lower()
    code, _, stderr = _bench(["--model", str(tiny_bundle), "--prompts", str(prompts_dir), "--heads", "7",
                              "-n", "4", "--repeat", "1", "--ctx", "128", "-q", "--no-anchor"])
    assert code == 2 and "3 draft heads" in stderr
    code, _, stderr = _bench(["--model", str(tiny_bundle), "--prompts", str(tmp_path / "missing")])
    assert code == 66


def test_default_prompts_are_heldout_stdlib_snippets():
    from converters.data import is_heldout
    from mtpcode.bench.run import default_prompts

    prompts = default_prompts(3)
    assert len(prompts) == 3
    assert prompts == default_prompts(3)  # deterministic
    for p in prompts:
        rel, line = p.name.rsplit(":", 1)
        assert is_heldout(rel) and int(line) > 0
        assert p.text.rstrip().split("\n")[-1].lstrip().startswith("def ")


def test_synthetic_cost_model_tiny_shape(tmp_path, monkeypatch):
    from mtpcode.bench import synthetic as S
    from mtpcode.bench.run import run_synthetic
    from mtpcode.bundle import open_bundle

    monkeypatch.setenv("MTPCODE_CACHE_DIR", str(tmp_path / "cache"))
    doc = run_synthetic("tiny", ["Q4_0", "Q4_K_M"], max_batch=4, repeat=1, threads=2, repack=True,
                        modes=("off", "repack"))
    assert doc["kind"] == "synthetic"
    # extra buffer types off, and CPU_REPACK for the Q4_0 / Q4_K block weights: neither crashes
    assert [(m["quantization"], m["mode"]) for m in doc["measurements"]] == [
        ("Q4_0", "off"), ("Q4_0", "repack"), ("Q4_K_M", "off"), ("Q4_K_M", "repack")]
    for m in doc["measurements"]:
        assert not m.get("crashed"), m
        assert set(m["verify_s"]) == {"1", "2", "3", "4"}
        assert all(v > 0 for v in m["verify_s"].values())
        assert m["verify_rel"]["1"] == pytest.approx(1.0)
        assert m["head_s"] > 0
        pj = m["projection"]
        assert pj["label"].startswith("PROJECTION")
        assert pj["per_k"][0]["speedup"] == pytest.approx(1.0)  # no drafts: the plain cost
        assert pj["at_n"]["drafts"] == 3
        assert pj["at_n"]["tokens_per_forward"] == pytest.approx(3.5, abs=1e-3)
    # the bundle is a valid bundle of the requested shape and is reused from the cache
    path = S.build_bundle("tiny", "Q4_0", n_heads=1)
    b = open_bundle(path)
    assert b.manifest.n_embd == 256 and b.manifest.quantization == "Q4_0" and b.manifest.n_heads == 1
    assert S.build_bundle("tiny", "Q4_0", n_heads=1) == path


def test_synthetic_bundle_runs_in_the_engine(tmp_path, monkeypatch):
    """The random quantized blocks are valid: the full synthetic bundle decodes through the runtime."""
    from mtpcode.bench import synthetic as S
    from mtpcode.generation import Done, GenerationOptions
    from mtpcode.runtime import Engine

    monkeypatch.setenv("MTPCODE_CACHE_DIR", str(tmp_path / "cache"))
    path = S.build_bundle("tiny", "Q4_K_M")
    with Engine(path, n_ctx=64, n_threads=2) as engine:
        assert engine.n_heads == 3
        events = list(engine.generate([1, 300, 301, 302], GenerationOptions(max_tokens=8)))
        # this vocabulary has no "\u2581" piece: each space is 3 byte tokens, more tokens than bytes
        text = "def f(a, b, c):\n    return a + b + c\n"
        assert len(engine.tokenize(text)) > len(text.encode()) + 8
    done = events[-1]
    assert isinstance(done, Done) and done.stats.generated_tokens > 0


def test_projection_arithmetic():
    from mtpcode.bench.costmodel import geometric_acceptance
    from mtpcode.bench.synthetic import project

    a = geometric_acceptance(3.5, 3)
    assert 1 + a + a * a + a ** 3 == pytest.approx(3.5, abs=1e-6)
    costs = {"verify_rel": {"1": 1.0, "2": 1.0, "3": 1.0, "4": 1.0}, "head_rel": 0.0}
    pj = project(costs, 3.5, 3)
    assert pj["at_n"]["speedup"] == pytest.approx(3.5, abs=1e-3)  # free verification: speedup = tokens/forward
    costs = {"verify_rel": {"1": 1.0, "2": 2.0, "3": 3.0, "4": 4.0}, "head_rel": 0.1}
    assert project(costs, 3.5, 3)["best"]["drafts"] == 0  # verification as dear as decoding: never pays


def test_divergence_margins_recompute_the_plain_choice(tiny_bundle, tmp_path):
    """A (constructed) divergence from the plain output is measured on the real model:
    the plain token is the argmax there, by a positive logit gap."""
    from mtpcode.bench.run import Prompt, divergence_margins, run_bench

    doc = run_bench(tiny_bundle, [Prompt("p", "def add(a, b):\n    return")], heads=[1], max_tokens=8, repeat=1,
                    threads=2, n_ctx=128, anchor=False, costs=False)
    plain = doc["prompts"][0]["plain_token_ids"]
    assert len(plain) > 4
    other = list(plain)
    other[3] = (plain[3] + 1) % 512
    doc["mismatches"] = [{"prompt": "p", "prompt_index": 0, "config": "1 head", "repeat": 0,
                          "first_difference_at": 3, "tokens": len(other), "reference_tokens": len(plain),
                          "token_ids": other}]
    (gap,) = divergence_margins(doc)
    assert gap["at_token"] == 3 and gap["plain_token"] == plain[3]
    assert gap["argmax_here"] == plain[3] and gap["logit_gap"] > 0


def test_the_bar_is_cpu_time_only_when_every_forward_ran_on_one_thread() -> None:
    from mtpcode.bench.run import bar_estimator

    assert bar_estimator({"threads": 1, "threads_batch": 1}) == "speedup_cpu"
    assert bar_estimator({"threads": 1}) == "speedup_cpu"  # files from before threads_batch
    # verifies on a second thread: the decoding thread's CPU time misses their work
    assert bar_estimator({"threads": 1, "threads_batch": 2}) == "speedup"
    assert bar_estimator({"threads": 4, "threads_batch": 4}) == "speedup"


def test_context_ceiling_oracle() -> None:
    """The oracle copies a repetition when rows are cheap, steps plainly when they cost as much as steps,
    and finds the cheapest path: with a rebuild that eats a 1-token draft's gain it drafts only long runs."""
    from mtpcode.bench.ceiling import context_ceiling

    period = [10, 11, 12, 13, 14, 15, 16, 17]
    prompt = [1] + period * 3
    out = period * 4  # the model goes on repeating the prompt
    free = {1: 1.0, 2: 1.0}  # every row free (the last segment continues flat)
    c = context_ceiling(prompt, [], out, free)
    assert c["copied"] > 0.9 and c["speedup"] == pytest.approx(c["tokens_per_forward"]) and c["speedup"] > 10
    linear = {1: 1.0, 2: 2.0}  # a row costs a step: drafting never pays
    assert context_ceiling(prompt, [], out, linear) == {"speedup": 1.0, "copied": 0.0, "tokens_per_forward": 1.0}
    unrelated = context_ceiling(prompt, [], [90, 91, 92, 93, 94, 95], free)
    assert unrelated["speedup"] == 1.0 and unrelated["copied"] == 0.0
    # rows cost 0.1 each and a change of batch shape 1.0 (llama.cpp rebuilds its graph only then):
    # the 31 tokens after the first come in two verifies of one size (15 drafts each), one rebuild
    # (16 + 14 drafts would pay two) ...
    cheap = {1: 1.0, 2: 1.1, 3: 1.2}
    long = context_ceiling(prompt, [], out, cheap, rebuild_s=1.0)
    assert long["speedup"] == pytest.approx(31 / ((2.5 + 1.0) + 2.5), rel=1e-3)
    # ... and 63 tokens in four such verifies still pay one rebuild, not four
    assert context_ceiling(prompt, [], period * 8, cheap, rebuild_s=1.0)["speedup"] == pytest.approx(
        63 / (4 * 2.5 + 1.0), rel=1e-3)
    assert context_ceiling(prompt, [], out[:3], cheap, rebuild_s=1.0)["copied"] == 0.0  # a draft pays no rebuild


# The benchmark scripts, each run as ``python -m mtpcode.bench.<name>``.
SCRIPTS = ("synthetic", "typists", "probe", "threads", "convert_memory", "gpu", "report")


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_script_answers_help_and_a_bad_argument_with_its_usage(name):
    import mtpcode.bench

    prog = f"python -m mtpcode.bench.{name}"
    source = (Path(mtpcode.bench.__file__).parent / f"{name}.py").read_text(encoding="utf-8")
    assert prog in (ast.get_docstring(ast.parse(source)) or "")  # the docstring gives the usage
    for args, code in ((["--help"], 0), (["--no-such-option"], 2)):
        proc = subprocess.run([sys.executable, "-m", f"mtpcode.bench.{name}", *args], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == code, proc.stderr
        assert (proc.stdout if code == 0 else proc.stderr).startswith(f"usage: {prog}")
        assert "Traceback" not in proc.stderr
