"""The typing and throughput benchmarks' own logic, without llama_cpp.server: the regions the
typists type, when they pause, what counts as a finished suggestion, several typists against a
real `mtpcode serve --http` on a tiny bundle, and the throughput module's forward costs and
ceiling arithmetic. No timing assertions: the machine is shared and noisy."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from http_helpers import HttpServer

from mtpcode.bench import throughput, typists
from mtpcode.bench.typists import Keystroke, Typing, finished, is_pause

SOURCE = "\n".join(
    [f"def f{i}(a, b):\n    x = a + {i}\n    return x * b\n" for i in range(60)]
    + ["def target(items):", "    total = 0", "    for item in items:", "        total += item", "    return total",
       ""])


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "code.py"
    path.write_text(SOURCE, encoding="utf-8")
    return path


def test_a_single_typist_types_from_the_start_line_as_before(source):
    one = Typing.from_file(source, "def target(", 3)
    assert Typing.regions(source, "def target(", 3, 1) == [one]
    assert "".join(one.keys) == "def target(items):\n    total = 0\n    for item in items:"
    assert "\n    total = 0" not in one.keys and "\n    " in one.keys  # Enter brings its indentation
    assert one.before + "".join(one.keys) + one.after == SOURCE


def test_typists_type_regions_far_apart_that_end_at_the_start_line(source):
    docs = Typing.regions(source, "def target(", 2, 3, max_keys=25)
    firsts = [doc.before.count("\n") for doc in docs]  # each region's first line (from 0)
    marker = SOURCE.split("\n").index("def target(items):")
    assert firsts[-1] == marker and firsts == sorted(firsts) and firsts[0] >= marker // 3 - 1
    assert min(b - a for a, b in itertools.pairwise(firsts)) > 20
    for doc in docs:
        assert len(doc.keys) == 25
        assert doc.before + "".join(doc.keys) + doc.after == SOURCE  # the keys are the file's own text
        assert SOURCE.split("\n")[doc.before.count("\n")].strip()  # a region starts on a line of code
    with pytest.raises(SystemExit, match="overlap"):
        Typing.regions(source, "def target(", 2, 3, max_keys=2000)


def test_a_typist_pauses_at_line_ends_or_every_kth_key():
    keys = list("ab") + ["\n    "] + list("cd")
    assert [i for i in range(len(keys)) if is_pause(keys, i, 0)] == [1, 4]
    assert [i for i in range(len(keys)) if is_pause(keys, i, 2)] == [1, 3]


def test_a_finished_suggestion_is_neither_cut_short_nor_abandoned():
    def ks(**kw) -> Keystroke:
        return Keystroke(index=0, prompt_chars=1, pause=True, done_ms=5.0, **kw)

    assert finished(ks(finish_reason="length", tokens=32), 32)
    assert finished(ks(finish_reason="stop", tokens=3), 32)  # an end of its own
    assert finished(ks(finish_reason="length"), 32)  # the server does not count its tokens
    assert not finished(ks(finish_reason="length", tokens=0), 32)  # cut short by the server
    assert not finished(ks(), 32)  # the stream ended without a final chunk (llama_cpp.server interrupted)
    assert not finished(ks(finish_reason="stop", abandoned=True), 32)


def test_llama_cpp_servers_verbose_log_gives_the_prompt_tokens_evaluated():
    log = ["Llama.generate: 812 prefix-match hit, remaining 7 prompt tokens to eval\n", "noise\n",
           "Llama.generate: 5 prefix-match hit, remaining 300 prompt tokens to eval\n",
           "Llama.generate: full prompt already cached\n"]
    assert typists.llama_cpp_evaluated(log) == (307, 3)


def test_typists_option_takes_a_list_and_rejects_nonsense():
    p = typists.parser()
    assert p.parse_args(["--out", "x"]).typists == [1]
    args = p.parse_args(["--typists", "1,4", "--pause-every", "10", "--keys", "120", "--out", "x"])
    assert (args.typists, args.pause_every, args.keys, args.model_name) == ([1, 4], 10, 120, typists.MODEL_NAME)
    for bad in ("0", "2,x", ""):
        with pytest.raises(SystemExit):
            p.parse_args(["--typists", bad, "--out", "x"])


def test_typists_each_abandon_only_their_own_requests_on_a_real_server(tiny_bundle, source):
    docs = Typing.regions(source, "def target(", 2, 2, max_keys=12)
    server = HttpServer("--no-repeat-stop", bundle=tiny_bundle)
    try:
        typists.warm(server.url, docs, endpoint="/v1/completions", max_tokens=8, model="PLACEHOLDER")
        evaluated = server.metrics()["llamacpp:prompt_tokens_total"]
        records = asyncio.run(typists.type_together(server.url, docs, endpoint="/v1/completions", interval_s=0.03,
                                                    max_tokens=8, pause_every=6, model="PLACEHOLDER"))
        metrics = server.metrics()
    finally:
        server.stop()
    assert [k.typist for k in records] == [0] * 12 + [1] * 12
    assert {k.status for k in records} <= {200, None}  # the arbitrary model name is served (None: dropped early)
    for typist, doc in enumerate(docs):
        mine = [k for k in records if k.typist == typist]
        assert [k.prompt_chars for k in mine] == [len(doc.before + "".join(doc.keys[: i + 1])) for i in range(12)]
        pauses = [k for k in mine if k.pause]
        assert [k.index for k in pauses] == [5, 11]
        # every pause is answered in full: the other typist's keystrokes never cut it short
        assert all(finished(k, 8) for k in pauses), pauses
        assert not any(k.abandoned for k in pauses)
    # the server read each keystroke's new text, not each prompt anew (each is hundreds of tokens)
    assert metrics["llamacpp:prompt_tokens_total"] - evaluated < sum(len(d.keys) for d in docs) * 10
    assert min(len(d.before) for d in docs) > 1000


def test_typists_drive_a_running_server_from_their_own_source_addresses(tiny_bundle, source, tmp_path):
    """--connect starts no server: the typists type to the one given, each from its --source address
    (what a proxy routing by client address goes by), and the results are recorded under --label."""
    # one llama.cpp thread: two spin on a machine whose cores are busy (other benchmarks) and crawl
    server = HttpServer("-v", "--no-repeat-stop", "--threads", "1", bundle=tiny_bundle)
    out = tmp_path / "typing.json"
    try:
        typists.main(["--connect", server.url + "/", "--label", "running", "--source", "127.0.0.2,127.0.0.3",
                      "--typists", "2", "--keys", "8", "--pause-every", "4", "--interval-ms", "30",
                      "--max-tokens", "8", "--file", str(source), "--start", "def target(", "--rounds", "1",
                      "--out", str(out)])
    finally:
        server.stop()
    # the server's -v log names each request's client address: the warm-ups and keystrokes came from both
    peers = [m.group(1) for line in server.stderr
             if (m := re.match(r"mtpcode: request \d+ \((127\.0\.0\.\d+):\d+ /infill\)", line))]
    assert set(peers) == {"127.0.0.2", "127.0.0.3"} and len(peers) >= 2 * 2, peers
    data = json.loads(out.read_text())
    assert data["connect"] == server.url and data["endpoint"] == "/infill" and data["threads"] is None
    assert data["source"] == ["127.0.0.2", "127.0.0.3"] and data["metrics"] == [server.url]
    [summary] = data["summary"]
    assert summary["server"] == "running" and summary["typists"] == 2 and summary["requests"] == 16
    assert summary["pauses_finished"] == summary["pauses"] == 4
    assert summary["requests_per_server"] == {server.url: summary["requests_counted_server_side"]}
    assert summary["requests_counted_server_side"] >= 1 and summary["tokens_predicted"] > 0
    [run] = data["runs"]
    assert run["server"] == "running" and [k["typist"] for k in run["keystrokes"]] == [0] * 8 + [1] * 8


def test_connect_rejects_options_of_the_servers_it_would_start(capsys):
    for extra in (["--servers", "mtpcode"], ["--threads", "2"], ["--ctx", "8192"]):
        with pytest.raises(SystemExit):
            typists.main(["--connect", "http://127.0.0.1:1", *extra, "--out", "x"])
        assert "--connect starts none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        typists.main(["--label", "x", "--out", "x"])
    assert "--label goes with --connect" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        typists.main(["--connect", "http://127.0.0.1:1", "--typists", "3", "--source", "127.0.0.2,127.0.0.3",
                      "--out", "x"])
    assert "--source: 2 address(es) for 3 typists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        typists.parser().parse_args(["--source", "127.0.0.2,nowhere", "--out", "x"])


def test_throughput_answers_help_with_its_usage():
    proc = subprocess.run([sys.executable, "-m", "mtpcode.bench.throughput", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m mtpcode.bench.throughput")
    bad = subprocess.run([sys.executable, "-m", "mtpcode.bench.throughput", "--configs", "fast", "--out", "x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown configuration 'fast'" in bad.stderr and "Traceback" not in bad.stderr


def test_forward_costs_of_sequences_in_one_context(tiny_bundle):
    from mtpcode.bundle import open_bundle

    bundle = open_bundle(tiny_bundle)
    lengths = [list(range(5, 45)), list(range(7, 27)), list(range(9, 79))]
    costs = throughput.forward_costs(bundle.main_path, bundle.manifest.trunk_tensor, lengths, n_ctx=256,
                                     threads=1, repeat=6)
    assert costs["sequences"] == 3 and costs["context_lengths"] == [40, 20, 70]
    assert len(costs["one_row_all_s"]) == len(costs["rows_all_s"]) == 6
    assert costs["one_row_s"] > 0 and costs["rows_s"] > 0 and costs["cost_ratio"] > 0
    assert costs["one_row_others_empty_s"] > 0


def test_the_ceiling_is_n_over_the_cost_ratio_times_the_rate_alone():
    answers = [{"tokens": 100, "predicted_ms": 100.0, "wall_s": 0.2}, {"tokens": 100, "predicted_ms": 300.0,
                                                                       "wall_s": 0.3}]
    assert throughput.alone_rate(answers) == {"tokens": 200, "timings_tokens_per_s": 500.0,
                                              "wall_tokens_per_s": 400.0}
    config = {"rounds": [{"alone_timings_tokens_per_s": 500.0, "alone_wall_tokens_per_s": 400.0,
                          "together_tokens_per_s": 600.0, "identical": [True, True]}]}
    report = throughput.ceiling_report(config, cost_ratio=2.5, n=4)
    assert report["ceiling_speedup"] == 1.6 and report["ceiling_tokens_per_s"] == 800.0
    assert report["ratio_to_ceiling"] == 0.75 and report["ratio_to_ceiling_wall"] == pytest.approx(0.938, abs=1e-3)
    assert report["all_identical"] is True
