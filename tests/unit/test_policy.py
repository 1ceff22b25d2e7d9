"""The drafting policy (mtpcode.policy) as a unit, on simulated steps, and the acceptance
rule for deterministic drafts (mtpcode.sampling)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtpcode.drafters.base import Match
from mtpcode.policy.chooser import DraftPolicy, Plan
from mtpcode.policy.context import CONTEXT_PRIOR
from mtpcode.policy.costs import FixedCosts, MeasuredCosts


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
        # what the step produced after the pending token: the context's first token or not
        hit = acc > 0 if plan.context else (accept_context > 0 and rng.random() < p_context)
        first = match.tokens[0] if match is not None and hit else -1
        policy.observe(plan, match, acc, first, t_row * (1 + per_row * plan.drafts),
                       t_head * plan.head_forwards, plan.head_forwards)
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
    policy.costs.t_verify = {rows: 0.010 * (1 + 0.2 * (rows - 1)) for rows in range(1, 18)}  # every size measured
    policy.switch_margin = 100.0  # nothing is drafted while the policy only watches
    for _ in range(50):
        plan = policy.plan(match, room=16)
        assert not plan.context
        policy.observe(plan, match, 0, match.tokens[0], 0.010, 0.0, 0)  # the context was right
    assert policy.context.recent_hit
    policy.switch_margin = DraftPolicy.switch_margin
    assert policy.plan(match, room=16).context > 0
    policy.observe(Plan(), match, 0, 99, 0.010, 0.0, 0)  # ... and a miss is remembered for the next step
    assert not policy.context.recent_hit


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
    costs = policy.costs
    assert isinstance(costs, MeasuredCosts)
    costs.t_verify = {rows: 0.010 + 0.001 * (rows - 1) for rows in range(1, 18)}  # every size measured
    plain, verify = Plan(), Plan(context=4)
    match = Match(6, tuple(range(16)), "text")
    policy.observe(verify, match, 1, -1, 0.014, 0.0, 0)
    policy.observe(plain, None, 0, -1, 0.016, 0.0, 0)  # the rebuild: 6 ms more than a step
    assert costs.t_verify[1] == pytest.approx(0.010)
    assert costs.t_switch == pytest.approx(0.006)
    assert costs.verify(5) == pytest.approx(0.014 + 0.006)
    assert costs.verify(1) == pytest.approx(0.010)
    policy.observe(plain, None, 0, -1, 0.010, 0.0, 0)  # the next step reuses the graph again
    assert costs.t_verify[1] == pytest.approx(0.010) and costs.t_switch == pytest.approx(0.006)
    state = json.loads(json.dumps(policy.state()))
    fresh = DraftPolicy(0, adaptive=True)
    assert fresh.restore(state) and isinstance(fresh.costs, MeasuredCosts)
    assert fresh.costs.t_switch == pytest.approx(0.006)

    # A one-token draft every other step, right 80% of the time: a 2-row verify costs 1.1 steps for
    # 1.8 tokens, a gain ... until the rebuild after it costs a step as well (a verify and the step
    # after it then cost 3.1 steps for 2.8 tokens): then the policy stays plain.
    def drafted(rebuild: float) -> int:
        policy = DraftPolicy(0, adaptive=True)
        assert isinstance(policy.costs, MeasuredCosts)
        policy.costs.t_verify = {1: 0.010, 2: 0.011}
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
            policy.observe(plan, match, int(hit and bool(plan.context)), 7 if hit else -1, t, 0.0, 0)
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
    assert fresh.context.q == policy.context.q
    assert isinstance(fresh.costs, MeasuredCosts) and isinstance(policy.costs, MeasuredCosts)
    assert fresh.costs.t_verify == policy.costs.t_verify
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
            if sampling.accept_deterministic(p, draft, rng):
                counts[draft] += 1
                accepted += 1
            else:
                counts[sampling.residual_deterministic(p, draft, rng, scratch)] += 1
        expected = p * n
        support = expected > 0
        chi2 = float((((counts - expected) ** 2)[support] / expected[support]).sum())
        assert chi2 < 24.3, (draft, chi2)  # 99.95th percentile of chi-square with 6 degrees of freedom
        assert counts[~support].sum() == 0
        assert abs(accepted / n - p[draft]) < 0.005


def test_deterministic_rule_draws_as_the_general_rule_with_a_one_hot_q() -> None:
    from mtpcode import sampling

    p = np.array([0.35, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.0])
    one_hot = np.zeros_like(p)
    for draft in (0, 3, 7):
        one_hot[:] = 0.0
        one_hot[draft] = 1.0
        a, b = np.random.default_rng(7), np.random.default_rng(7)
        for _ in range(200):
            ok = sampling.accept_deterministic(p, draft, a)
            assert ok == sampling.accept(p, one_hot, draft, b)
            if not ok:
                assert (sampling.residual_deterministic(p, draft, a, np.empty_like(p))
                        == sampling.residual(p, one_hot, b, np.empty_like(p)))


def test_the_fixed_cost_model_is_the_stated_formula() -> None:
    costs = FixedCosts()
    assert [costs.verify(rows) for rows in (1, 2, 5)] == pytest.approx([1.0, 1.3, 2.2])
    assert costs.head() == pytest.approx(0.05)
    costs.observe(3, 9.0, 1.0, 2)  # times never move it
    assert costs.verify(3) == pytest.approx(1.6)


def test_a_state_is_restored_whole_or_not_at_all() -> None:
    policy = DraftPolicy(3, adaptive=True)
    match = Match(6, tuple(range(16)), "text")
    _steps(policy, 60, match, accept_context=5, accept_heads=1)
    state = json.loads(json.dumps(policy.state()))
    fresh = DraftPolicy(3, adaptive=True)
    before = fresh.state()
    bad = dict(state, t_head=1e9)  # the costs part is invalid, the others are fine
    assert not fresh.restore(bad)
    assert fresh.state() == before and not fresh.learned
    assert fresh.restore(state)
    assert fresh.context.q == policy.context.q and fresh.heads.chain == policy.heads.chain
    assert fresh.steps == fresh.schedule.warmup_steps  # no warm-up after a restore


def test_draft_policy_follows_acceptance_and_cost() -> None:
    # heads never accepted: drafting costs verify rows and head forwards for nothing
    policy = DraftPolicy(3, adaptive=True)
    chosen = []
    for _ in range(64):
        k = policy.plan(None, room=16).heads
        chosen.append(k)
        policy.observe(Plan(heads=k), None, 0, -1, 0.010 * (1 + 0.5 * k), 0.001 * k, k)
    assert chosen[:6] == [0, 0, 1, 1, 1, 1]  # warm-up: plain, then one head
    assert chosen[-16:].count(0) >= 14  # then plain decoding, with an occasional probe
    # heads always accepted and verify rows nearly free: keep all heads
    policy = DraftPolicy(3, adaptive=True)
    for _ in range(64):
        k = policy.plan(None, room=16).heads
        policy.observe(Plan(heads=k), None, k, -1, 0.010 * (1 + 0.1 * k), 0.001 * k, k)
    assert policy.schedule.k == 3
    # probes back off while they confirm the choice: useless heads are tried rarely ...
    policy = DraftPolicy(3, adaptive=True)

    def steps(n: int, accept: bool) -> list[int]:
        out = []
        for _ in range(n):
            k = policy.plan(None, room=16).heads
            out.append(k)
            policy.observe(Plan(heads=k), None, k if accept else 0, -1, 0.010 * (1 + 0.3 * k), 0.0005 * k, k)
        return out

    chosen = steps(4000, accept=False)
    assert sum(1 for k in chosen[8:] if k) <= 12  # log2(4000 / 16) probes, give or take
    # ... yet heads that start being accepted are found again quickly
    chosen = steps(1000, accept=True)
    assert policy.schedule.k == 3 and chosen[-500:].count(3) >= 490
    assert chosen.index(3) < 600
    # not adaptive: always every head
    policy = DraftPolicy(2, adaptive=False)
    assert {policy.plan(None, room=16).heads for _ in range(40)} == {2}


def test_costs_are_learned_per_batch_regime() -> None:
    """Alone, a context that is always accepted is drafted from; beside three other sequences, where
    the policy is charged its rows' share of a forward whose rows cost about the same each, the same
    context does not pay for long drafts, and the policy learns that without forgetting the alone
    table, which it returns to (and saves, with the batched ones)."""
    match = Match(8, tuple(range(16)), "text")
    policy = DraftPolicy(0, adaptive=True)

    def run(n: int, batch: int, per_row: float) -> list[Plan]:
        plans = []
        for _ in range(n):
            plan = policy.plan(match, room=16, batch=batch)
            plans.append(plan)
            acc = min(plan.context, 2)  # two tokens of every draft are right
            policy.observe(plan, match, acc, match.tokens[0], 0.010 * (1 + per_row * plan.drafts), 0.0, 0)
        return plans

    alone = run(300, 1, per_row=0.05)  # alone: extra rows almost free
    assert np.mean([p.context for p in alone[-50:]]) >= 2
    batched = run(300, 4, per_row=1.0)  # beside others: each row its full share
    assert sum(p.context > 0 for p in batched[-50:]) <= 10
    again = run(50, 1, per_row=0.05)
    assert np.mean([p.context for p in again[-20:]]) >= 2  # the alone table was kept
    state = json.loads(json.dumps(policy.state()))
    assert set(state["batched"]) == {"4"}
    fresh = DraftPolicy(0, adaptive=True)
    assert fresh.restore(state)
    fresh.plan(match, room=16, batch=3)  # 3 sequences: the 4 regime
    assert fresh.costs.t_verify == pytest.approx(policy._by_regime[4].t_verify)


def test_seeded_sampling_plans_ignore_the_batch() -> None:
    """Fixed costs (seeded sampling): the same plans alone and beside others."""
    match = Match(8, tuple(range(16)), "text")
    a, b = DraftPolicy(3, adaptive=True, measured=False), DraftPolicy(3, adaptive=True, measured=False)
    plans_a = [a.plan(match, room=16, batch=1) for _ in range(20)]
    plans_b = [b.plan(match, room=16, batch=4) for _ in range(20)]
    assert plans_a == plans_b and isinstance(b.costs, FixedCosts)
