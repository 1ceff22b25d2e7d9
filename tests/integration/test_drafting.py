"""Drafting in the runtime on real tiny bundles, against plain decoding of the same engine:
greedy output must be identical for every draft source (heads, context, both), and drafts
from a context that repeats must really be accepted (fewer forwards than plain)."""

from __future__ import annotations

import json

import pytest

from mtpcode.generation import Done, GenerationOptions, Piece, SamplingOptions
from mtpcode.runtime import Engine

CTX = 512


# ---------------------------------------------------------------------------
# the runtime on tiny bundles


def generate(engine: Engine, prompt, **opts) -> tuple[list[int], list[bool], Done]:
    tokens: list[int] = []
    flags: list[bool] = []
    done = None
    for ev in engine.generate(prompt, GenerationOptions(**opts)):
        if isinstance(ev, Piece):
            tokens += ev.token_ids
            flags += ev.drafted
        else:
            done = ev
    assert isinstance(done, Done)
    return tokens, flags, done


REPEATING = [
    "for i in range(10):\n    x = i * 2\n    y = x + 1\n" * 6,
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n",
    "import os\nimport sys\n\nclass Foo(object):\n    pass\n\nclass Bar(object):\n",
]
SOURCES = {  # draft source -> options
    "context": dict(heads=0, context_draft=True),
    "heads": dict(heads=3, context_draft=False),
    "both": dict(heads=3),  # the default: heads and context, chosen per step
}


@pytest.fixture(scope="module")
def builtin_bundle():
    from mtpcode.models import builtin_model_path

    path = builtin_model_path()
    assert path is not None
    return path


@pytest.mark.parametrize("bundle_name", ["tiny_bundle", "agree_bundle", "builtin_bundle"])
def test_greedy_output_identical_to_plain_for_every_draft_source(request, bundle_name) -> None:
    """Random heads (tiny), heads that agree often (agree), and a trained model whose output loops
    (the built-in one): the same tokens as plain decoding, whatever drafted them."""
    bundle = request.getfixturevalue(bundle_name)
    totals = {name: {"context_accepted": 0, "forwards": 0, "plain_forwards": 0} for name in SOURCES}
    with Engine(bundle, n_ctx=CTX, n_threads=1) as engine:
        for prompt in REPEATING:
            ids = engine.tokenize(prompt)
            plain, plain_flags, pd = generate(engine, ids, max_tokens=60, heads=0, context_draft=False)
            assert not any(plain_flags) and pd.stats.main_forwards == len(plain) - (pd.stop_reason == "max_tokens")
            # the "retyped" case: the text after the cursor is what the model will write
            suffix = engine.detokenize(plain)
            for name, opts in SOURCES.items():
                for sfx in ("", suffix):
                    tokens, flags, done = generate(engine, ids, max_tokens=60, suffix=sfx, **opts)
                    assert tokens == plain, (name, prompt, bool(sfx))
                    st = done.stats
                    assert sum(flags) <= sum(st.accepted_by_source.values())
                    if name == "heads":
                        assert st.drafted_by_source["context"] == 0
                    if name == "context":
                        assert st.drafted_by_source["heads"] == 0 and st.drafted_tokens == []
                    assert sum(st.forwards_by_source.values()) == st.main_forwards
                    # (the first token comes from the prefill's forward, which is not a decode step)
                    assert sum(st.tokens_by_source.values()) >= st.generated_tokens - 1
                    totals[name]["context_accepted"] += st.accepted_by_source["context"]
                    totals[name]["forwards"] += st.main_forwards
                    totals[name]["plain_forwards"] += pd.stats.main_forwards
    if bundle_name == "tiny_bundle":
        return  # a random model's output rarely repeats itself: exactness is what is checked there
    for name in ("context", "both"):
        assert totals[name]["context_accepted"] > 0, (name, totals)
        assert totals[name]["forwards"] < totals[name]["plain_forwards"], (name, totals)


def test_a_suffix_the_model_retypes_is_drafted_and_accepted(builtin_bundle) -> None:
    """The text after the cursor is what the model writes (a line retyped before identical text).

    The built-in model, whose output is text that tokenizes back to the same
    tokens (a random tiny model's byte soup does not survive the round trip).
    """
    with Engine(builtin_bundle, n_ctx=CTX, n_threads=1) as engine:
        ids = engine.tokenize(REPEATING[1])
        plain, _, pd = generate(engine, ids, max_tokens=48, heads=0, context_draft=False)
        suffix = engine.detokenize(plain)
        assert engine.tokenize(suffix, add_bos=False) == plain
        for opts in (dict(heads=0, context_draft=True), dict(heads=3)):
            tokens, flags, done = generate(engine, ids, max_tokens=48, suffix=suffix + "\n# the rest\n", **opts)
            assert tokens == plain
            st = done.stats
            # (how far it drafts follows measured costs; how much is accepted is the model's)
            assert st.accepted_by_source["context"] >= len(plain) // 3, opts
            assert st.main_forwards < 0.75 * pd.stats.main_forwards, opts
            assert st.tokens_per_forward_by_source["context"] > 1.5
            assert sum(flags) >= st.accepted_by_source["context"]


def test_sampling_with_context_drafts_is_reproducible_and_drafts(agree_bundle) -> None:
    sampling = SamplingOptions(temperature=0.7, seed=11)
    with Engine(agree_bundle, n_ctx=CTX, n_threads=1) as engine:
        ids = engine.tokenize(REPEATING[0])
        a, _, da = generate(engine, ids, max_tokens=60, heads=0, context_draft=True, sampling=sampling)
        b, _, _ = generate(engine, ids, max_tokens=60, heads=0, context_draft=True, sampling=sampling)
    with Engine(agree_bundle, n_ctx=CTX, n_threads=1) as fresh:
        c, _, _ = generate(fresh, ids, max_tokens=60, heads=0, context_draft=True, sampling=sampling)
    assert a == b == c
    assert da.stats.drafted_by_source["context"] > 0


def test_the_off_switch(tiny_bundle, tmp_path, monkeypatch) -> None:
    from mtpcode.config import load_settings

    with Engine(tiny_bundle, n_ctx=CTX, n_threads=1) as engine:
        ids = engine.tokenize(REPEATING[0])
        for opts in (dict(heads=3, context_draft=False), dict(heads=0), dict(heads=3, adaptive=False)):
            st = generate(engine, ids, max_tokens=40, suffix=REPEATING[0], **opts)[2].stats
            assert st.drafted_by_source["context"] == 0 and not st.context_draft, opts
        assert generate(engine, ids, max_tokens=40, heads=3)[2].stats.context_draft  # on by default
    # the setting: config file, environment, and what the front ends pass on
    assert load_settings().generation_options().context_draft is None
    monkeypatch.setenv("MTPCODE_CONTEXT_DRAFT", "off")
    assert load_settings().generation_options().context_draft is False
    monkeypatch.delenv("MTPCODE_CONTEXT_DRAFT")
    config = tmp_path / "config.toml"
    config.write_text("context_draft = false\n")
    monkeypatch.setenv("MTPCODE_CONFIG", str(config))
    assert load_settings().context_draft is False


def test_complete_json_reports_draft_sources_and_the_flag(tiny_bundle, tmp_path) -> None:
    from click.testing import CliRunner

    from mtpcode.cli import main

    src = tmp_path / "a.py"
    src.write_text(REPEATING[0], encoding="utf-8")
    runner = CliRunner()
    args = ["complete", str(src), "--model", str(tiny_bundle), "-n", "30", "--json", "--ctx", str(CTX)]
    on = runner.invoke(main, args)
    off = runner.invoke(main, [*args, "--no-context-draft"])
    assert on.exit_code == 0 and off.exit_code == 0, (on.output, off.output)
    a, b = json.loads(on.stdout), json.loads(off.stdout)
    assert a["text"] == b["text"]
    assert a["stats"]["context_draft"] is True and b["stats"]["context_draft"] is False
    for key in ("drafted_by_source", "accepted_by_source", "forwards_by_source", "tokens_per_forward_by_source"):
        assert key in a["stats"]
    assert b["stats"]["drafted_by_source"]["context"] == 0


def test_editing_prompt_set_is_third_party_code() -> None:
    from mtpcode.bench.run import editing_prompts, prompt_set

    prompts = editing_prompts(6)
    assert prompts == editing_prompts(6)  # deterministic
    assert len(prompts) == 6
    kinds = [q.name.rsplit(":", 1)[1] for q in prompts]
    assert kinds.count("repeat") == 3 and kinds.count("retype") == 3
    for q in prompts:
        package = q.name.split("/", 1)[0]
        assert package in ("click", "prompt_toolkit", "pygments")
        if q.name.endswith(":retype"):
            # the prompt ends inside the first line of the suffix: the line being retyped
            partial = q.text.rsplit("\n", 1)[1]
            assert q.suffix.startswith(partial) and len(q.suffix) > len(partial)
        else:
            assert q.text.rstrip().split("\n")[-1].lstrip().startswith("def ") and q.suffix == ""
    assert prompt_set("editing", 6) == prompts
