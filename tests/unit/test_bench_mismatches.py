"""Which greedy mismatches make `mtpcode bench` fail: only those no near-tie explains."""

from __future__ import annotations

from mtpcode.bench.run import format_mismatches, unexplained_mismatches


def _doc(gap: float) -> dict:
    mismatch = {"prompt": "p.py:3", "config": "3 heads", "repeat": 0, "first_difference_at": 20}
    return {"mismatches": [mismatch, {**mismatch, "config": "llama.cpp"}],
            "mismatch_margins": [{"prompt": "p.py:3", "at_token": 20, "plain_token": 5, "speculative_token": 7,
                                  "logit_gap": gap, "logit_std": 4.0, "argmax_here": 7}]}


def test_a_near_tie_explains_a_mismatch() -> None:
    doc = _doc(-0.006)  # 0.15 % of the logits' spread: kernel rounding
    assert unexplained_mismatches(doc, skip_config="llama.cpp") == []
    assert "a near-tie" in format_mismatches(doc)


def test_a_clear_gap_does_not() -> None:
    doc = _doc(-1.5)  # the speculative token was clearly not the model's choice
    assert [m["config"] for m in unexplained_mismatches(doc, skip_config="llama.cpp")] == ["3 heads"]
    assert "NOT a near-tie" in format_mismatches(doc)


def test_a_mismatch_without_a_margin_is_unexplained() -> None:
    doc = {**_doc(0.0), "mismatch_margins": []}  # e.g. one output a prefix of the other
    assert len(unexplained_mismatches(doc, skip_config="llama.cpp")) == 1
