"""Drafting from the context (mtpcode.drafting) and its place in the runtime.

The n-gram matcher and the policy are checked as units; the runtime on real
tiny bundles, against plain decoding of the same engine: greedy output must
be identical for every draft source (heads, context, both), and drafts from a
context that repeats must really be accepted (fewer forwards than plain).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtpcode.drafting import CONTEXT_PRIOR, ContextDrafter, DraftPolicy, Match, Plan, match_bucket
from mtpcode.generation import Done, GenerationOptions, Piece, SamplingOptions
from mtpcode.runtime import Engine

CTX = 512


# ---------------------------------------------------------------------------
# the n-gram matcher


def test_longest_match_and_its_continuation() -> None:
    d = ContextDrafter(max_draft=4)
    #         0  1  2  3  4  5  6  7  8  9
    d.begin([1, 5, 6, 7, 8, 9, 2, 6, 7, 3])
    # text ends "... 6 7 3", pending 5: no n-gram ending in 5 except the 1-gram at 1
    m = d.draft(5)
    assert m == Match(length=1, tokens=(6, 7, 8, 9), where="text")
    # pending 7 after "... 3": 2-gram (3, 7) unseen; 1-gram 7: latest occurrence is at 8, followed by 3;
    # the continuation reaches the text's end, then repeats what it copied ("3 7" again and again)
    assert d.draft(7) == Match(1, (3, 7, 3, 7), "text")
    d.accept([5, 6])  # text ... 3 5 6
    # pending 7: the 3-gram (5, 6, 7) occurred at 1..3 and beats the later 2-gram (6, 7) at 7..8
    m = d.draft(7)
    assert m is not None and m.tokens == (8, 9, 2, 6) and m.length == 3
    assert d.draft(4) is None  # never seen


def test_match_length_is_measured_back_beyond_the_ngram() -> None:
    d = ContextDrafter()
    block = list(range(100, 130))
    d.begin([1, *block, 7, *block[:20]])
    m = d.draft(block[20])
    assert m is not None and m.tokens[:5] == tuple(block[21:26])
    assert m.length == d.max_ngram + d.max_extend  # 21 tokens agree; measured up to the cap
    assert match_bucket(m.length) == len(CONTEXT_PRIOR) - 1


def test_suffix_first_occurrence_and_ties() -> None:
    d = ContextDrafter()
    d.begin([1, 10, 11, 12, 50], suffix=[11, 12, 13, 14, 11, 12, 99])
    # pending 12 after "... 50": (50, 12) unseen anywhere; 1-gram 12: text has it followed by 50,
    # the suffix first at 2 followed by 13 - a tie in length goes to the suffix, the first occurrence
    m = d.draft(12)
    assert m == Match(1, (13, 14, 11, 12, 99), "suffix")
    d.accept([12, 11])
    # text "... 50 12 11", pending 12: the 2-gram (11, 12) is in both, neither longer: the suffix's
    assert d.draft(12) == Match(2, (13, 14, 11, 12, 99), "suffix")
    d.accept([12, 13])  # text "... 11 12 13", pending 14: (11, 12, 13, 14) only in the suffix
    assert d.draft(14) == Match(4, (11, 12, 99), "suffix")
    d2 = ContextDrafter()
    d2.begin([1, 2, 3], suffix=[4, 5, 6, 7])
    assert d2.draft(4) == Match(1, (5, 6, 7), "suffix")
    assert d2.draft(7) is None  # the last suffix token has no continuation


def test_incremental_index_equals_a_fresh_one() -> None:
    """The index grown token by token finds the same matches as one built from the whole text."""
    rng = np.random.default_rng(0)
    text = [int(t) for t in rng.integers(0, 12, 300)]  # a small alphabet: many repeats
    suffix = [int(t) for t in rng.integers(0, 12, 40)]
    grown = ContextDrafter()
    grown.begin(text[:50], suffix)
    for i in range(50, 300, 7):
        grown.accept(text[i: i + 7])
    fresh = ContextDrafter()
    fresh.begin(text, suffix)
    for pending in range(14):
        assert grown.draft(pending) == fresh.draft(pending)
    assert grown.text == text


def test_empty_and_tiny_texts() -> None:
    d = ContextDrafter()
    d.begin([])
    assert d.draft(3) is None
    d.accept([3])
    assert d.draft(3) is None  # a token with nothing after it yet
    d.accept([3])
    assert d.draft(3) == Match(1, (3,) * d.max_draft, "text")  # "3 3" then 3: the run continues


# ---------------------------------------------------------------------------
# the policy


def _steps(policy: DraftPolicy, n: int, match: Match | None, accept_context: int, accept_heads: int,
           t_row: float = 0.010, per_row: float = 0.2, t_head: float = 0.0005, p_context: float = 1.0,
           seed: int = 0) -> list[Plan]:
    """Run the policy on a simulated step: a context draft has its first ``accept_context`` tokens
    accepted, each with probability ``p_context``; a heads-only draft its first ``accept_heads``."""
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(n):
        plan = policy.plan(match, room=16)
        plans.append(plan)
        if plan.context:
            acc = 0
            while acc < min(accept_context, plan.drafts) and rng.random() < p_context:
                acc += 1
        else:
            acc = min(accept_heads, plan.heads)
        policy.observe_plan(plan, match, acc, t_row * (1 + per_row * plan.drafts),
                            t_head * plan.head_forwards, plan.head_forwards)
        # what the step produced after the pending token: the context's first token or not
        hit = acc > 0 if plan.context else (accept_context > 0 and rng.random() < p_context)
        policy.after_step(match, plan, match.tokens[0] if match is not None and hit else -1)
    return plans


def test_policy_drafts_from_a_context_that_is_accepted() -> None:
    match = Match(8, tuple(range(16)), "text")
    policy = DraftPolicy(3, adaptive=True)
    plans = _steps(policy, 200, match, accept_context=16, accept_heads=0)
    assert all(not p.context for p in plans[:6])  # the heads' warm-up first
    late = plans[-50:]
    assert sum(p.kind == "context" for p in late) >= 45
    # all accepted and each row cheap: long drafts
    assert np.mean([p.context for p in late if p.context]) >= 8


def test_policy_stops_drafting_from_a_context_that_is_never_accepted() -> None:
    match = Match(1, (5, 6, 7, 8), "text")
    policy = DraftPolicy(0, adaptive=True)
    plans = _steps(policy, 2000, match, accept_context=0, accept_heads=0, per_row=0.5)
    # a handful of tries, then plain steps (no heads, no context) for good
    assert sum(1 for p in plans if p.context) <= 5
    assert {p.kind for p in plans[100:]} == {"plain"}


def test_steps_without_context_drafts_still_teach_the_policy() -> None:
    """A step that does not draft from the context still shows whether the context's first token
    would have been right: after a run of such hits the policy drafts from the context."""
    match = Match(6, tuple(range(16)), "text")
    policy = DraftPolicy(0, adaptive=True)
    policy.t_verify = {rows: 0.010 * (1 + 0.2 * (rows - 1)) for rows in range(1, 18)}  # every size measured
    policy.switch_margin = 100.0  # nothing is drafted while the policy only watches
    for _ in range(50):
        plan = policy.plan(match, room=16)
        assert not plan.context
        policy.observe_plan(plan, match, 0, 0.010, 0.0, 0)
        policy.after_step(match, plan, first=match.tokens[0])  # the context was right
    assert policy.recent_hit
    policy.switch_margin = DraftPolicy.switch_margin
    assert policy.plan(match, room=16).context > 0
    policy.after_step(match, Plan(), first=99)  # ... and a miss is remembered for the next step
    assert not policy.recent_hit


def test_policy_draft_length_follows_costs() -> None:
    """The same acceptance (each token with probability 0.8) pays for long drafts only when rows are cheap."""
    match = Match(6, tuple(range(16)), "text")

    def mean_length(per_row: float) -> float:
        policy = DraftPolicy(0, adaptive=True)
        plans = _steps(policy, 400, match, accept_context=16, accept_heads=0, per_row=per_row, p_context=0.8)
        return float(np.mean([p.context for p in plans[-200:]]))

    cheap, dear = mean_length(0.02), mean_length(0.6)
    assert cheap > dear
    assert dear <= 4


def test_a_verify_pays_for_the_graph_rebuild_it_causes() -> None:
    """llama.cpp rebuilds its graph when the batch shape changes, so the one-row step after a verify
    costs more than the others. The policy charges that extra to the verify, keeps it out of the
    step's own cost, and stops drafting where the extra eats the gain."""
    policy = DraftPolicy(0, adaptive=True)
    policy.t_verify = {rows: 0.010 + 0.001 * (rows - 1) for rows in range(1, 18)}  # every size measured
    plain, verify = Plan(), Plan(context=4)
    match = Match(6, tuple(range(16)), "text")
    policy.observe_plan(verify, match, 1, 0.014, 0.0, 0)
    policy.observe_plan(plain, None, 0, 0.016, 0.0, 0)  # the rebuild: 6 ms more than a step
    assert policy.t_verify[1] == pytest.approx(0.010)
    assert policy.t_switch == pytest.approx(0.006)
    assert policy._verify_time(5) == pytest.approx(0.014 + 0.006)
    assert policy._verify_time(1) == pytest.approx(0.010)
    policy.observe_plan(plain, None, 0, 0.010, 0.0, 0)  # the next step reuses the graph again
    assert policy.t_verify[1] == pytest.approx(0.010) and policy.t_switch == pytest.approx(0.006)
    state = json.loads(json.dumps(policy.state()))
    fresh = DraftPolicy(0, adaptive=True)
    assert fresh.restore(state) and fresh.t_switch == pytest.approx(0.006)

    # A one-token draft every other step, right 80% of the time: a 2-row verify costs 1.1 steps for
    # 1.8 tokens, a gain ... until the rebuild after it costs a step as well (a verify and the step
    # after it then cost 3.1 steps for 2.8 tokens): then the policy stays plain.
    def drafted(rebuild: float) -> int:
        policy = DraftPolicy(0, adaptive=True)
        policy.t_verify = {1: 0.010, 2: 0.011}
        short = Match(6, (7,), "text")
        rng = np.random.default_rng(0)
        n = 0
        last = 1
        for i in range(400):
            match = short if i % 2 else None
            plan = policy.plan(match, room=16)
            n += bool(plan.context)
            hit = rng.random() < 0.8
            t = 0.011 if plan.context else 0.010 + (rebuild if last > 1 else 0.0)
            policy.observe_plan(plan, match, int(hit and bool(plan.context)), t, 0.0, 0)
            policy.after_step(match, plan, 7 if hit else -1)
            last = plan.rows
        return n

    assert drafted(0.0) > 150
    assert drafted(0.010) < 20


def test_context_extended_by_heads_when_the_continuation_is_short() -> None:
    """A sure context token, then heads that are right twice in a row but cost a lot each: the context
    saves a head forward, the heads go on where the context's continuation ends."""
    match = Match(8, (42,), "text")  # one token of continuation
    policy = DraftPolicy(3, adaptive=True)
    plans = _steps(policy, 120, match, accept_context=3, accept_heads=2, per_row=0.05, t_head=0.003)
    late = plans[-40:]
    assert sum(p.kind == "context+heads" for p in late) >= 30
    assert all(p.context == 1 for p in late if p.kind == "context+heads")


def test_fixed_cost_model_is_deterministic() -> None:
    """Seeded sampling: plans depend only on outcomes, not on timings."""
    match = Match(5, tuple(range(10)), "text")
    runs = []
    for t_row in (0.01, 0.05):
        policy = DraftPolicy(3, adaptive=True, measured=False)
        runs.append(_steps(policy, 80, match, accept_context=2, accept_heads=0, t_row=t_row))
    assert runs[0] == runs[1]


def test_policy_state_round_trip_and_older_states() -> None:
    match = Match(6, tuple(range(16)), "text")
    policy = DraftPolicy(3, adaptive=True)
    _steps(policy, 100, match, accept_context=5, accept_heads=0)
    state = json.loads(json.dumps(policy.state()))
    fresh = DraftPolicy(3, adaptive=True)
    assert fresh.restore(state)
    assert fresh.ctx_q == policy.ctx_q and fresh.t_verify == policy.t_verify
    older = {k: v for k, v in state.items() if k != "context"}
    assert DraftPolicy(3, adaptive=True).restore(older)
    bad = dict(state, context={**state["context"], "q": [[2.0] * 16] * 2 * len(CONTEXT_PRIOR)})
    assert not DraftPolicy(3, adaptive=True).restore(bad)


# ---------------------------------------------------------------------------
# speculative sampling with deterministic drafts


def test_deterministic_draft_sampling_is_exact() -> None:
    """Accept x with probability p(x), else draw from p without x: the emitted token follows p.

    The same functions (sampling.accept / sampling.residual with q one-hot on
    the draft) the runtime uses for context drafts; a chi-square test over
    200,000 draws per draft token, seeded.
    """
    from mtpcode import sampling

    rng = np.random.default_rng(1234)
    p = np.array([0.35, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.0])
    scratch = np.empty_like(p)
    n = 200_000
    for draft in (0, 3, 6, 7):  # likely, middling, unlikely, impossible
        q = np.zeros_like(p)
        q[draft] = 1.0
        counts = np.zeros(len(p))
        accepted = 0
        for _ in range(n):
            if sampling.accept(p, q, draft, rng):
                counts[draft] += 1
                accepted += 1
            else:
                counts[sampling.residual(p, q, rng, scratch)] += 1
        expected = p * n
        support = expected > 0
        chi2 = float((((counts - expected) ** 2)[support] / expected[support]).sum())
        assert chi2 < 24.3, (draft, chi2)  # 99.95th percentile of chi-square with 6 degrees of freedom
        assert counts[~support].sum() == 0
        assert abs(accepted / n - p[draft]) < 0.005


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
        assert package in ("click", "prompt_toolkit", "pygments", "numpy")
        if q.name.endswith(":retype"):
            # the prompt ends inside the first line of the suffix: the line being retyped
            partial = q.text.rsplit("\n", 1)[1]
            assert q.suffix.startswith(partial) and len(q.suffix) > len(partial)
        else:
            assert q.text.rstrip().split("\n")[-1].lstrip().startswith("def ") and q.suffix == ""
    assert prompt_set("editing", 6) == prompts


def test_prompt_index_reused_across_generations_equals_a_fresh_one() -> None:
    """An editor re-sends the file with its end changed: ``begin`` rewinds and extends the previous prompt's
    index (restoring earlier occurrences of the n-grams it drops), and the result is the index, and the drafts,
    of a fresh build; after a larger change it rebuilds."""
    rng = np.random.default_rng(1)
    for _ in range(150):
        alpha = int(rng.integers(3, 15))  # small alphabets: many repeated n-grams to restore
        prompt = [int(t) for t in rng.integers(0, alpha, int(rng.integers(0, 200)))]
        reused = ContextDrafter()
        reused.begin(prompt, [1, 2])
        reused.accept([int(t) for t in rng.integers(0, alpha, int(rng.integers(0, 20)))])
        for _ in range(4):
            cut = max(0, len(prompt) - int(rng.integers(0, 90)))  # within max_rewind, or beyond it
            prompt = prompt[:cut] + [int(t) for t in rng.integers(0, alpha, int(rng.integers(0, 30)))]
            suffix = [1, 2] if rng.random() < 0.7 else [int(t) for t in rng.integers(0, alpha, 10)]
            reused.begin(prompt, suffix)
            fresh = ContextDrafter()
            fresh.begin(prompt, suffix)
            committed = [int(t) for t in rng.integers(0, alpha, int(rng.integers(0, 15)))]
            reused.accept(committed)
            fresh.accept(committed)
            assert reused.text == fresh.text == prompt + committed
            for pending in range(alpha):
                assert reused.draft(pending) == fresh.draft(pending)
