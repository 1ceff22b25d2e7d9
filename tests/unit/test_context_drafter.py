"""Prompt lookup (mtpcode.drafters.context): the n-gram matcher, its index reused across
generations, and what it proposes into a draft."""

from __future__ import annotations

import numpy as np

from mtpcode.drafters.base import Draft, Match
from mtpcode.drafters.context import ContextDrafter
from mtpcode.generation import DraftSource
from mtpcode.policy.context import CONTEXT_PRIOR, match_bucket

# ---------------------------------------------------------------------------
# the n-gram matcher


def test_longest_match_and_its_continuation() -> None:
    d = ContextDrafter(max_draft=4)
    #         0  1  2  3  4  5  6  7  8  9
    d.begin([1, 5, 6, 7, 8, 9, 2, 6, 7, 3])
    # text ends "... 6 7 3", pending 5: no n-gram ending in 5 except the 1-gram at 1
    m = d.lookup(5)
    assert m == Match(length=1, tokens=(6, 7, 8, 9), where="text")
    # pending 7 after "... 3": 2-gram (3, 7) unseen; 1-gram 7: latest occurrence is at 8, followed by 3;
    # the continuation reaches the text's end, then repeats what it copied ("3 7" again and again)
    assert d.lookup(7) == Match(1, (3, 7, 3, 7), "text")
    d.accept([5, 6])  # text ... 3 5 6
    # pending 7: the 3-gram (5, 6, 7) occurred at 1..3 and beats the later 2-gram (6, 7) at 7..8
    m = d.lookup(7)
    assert m is not None and m.tokens == (8, 9, 2, 6) and m.length == 3
    assert d.lookup(4) is None  # never seen


def test_match_length_is_measured_back_beyond_the_ngram() -> None:
    d = ContextDrafter()
    block = list(range(100, 130))
    d.begin([1, *block, 7, *block[:20]])
    m = d.lookup(block[20])
    assert m is not None and m.tokens[:5] == tuple(block[21:26])
    assert m.length == d.max_ngram + d.max_extend  # 21 tokens agree; measured up to the cap
    assert match_bucket(m.length) == len(CONTEXT_PRIOR) - 1


def test_suffix_first_occurrence_and_ties() -> None:
    d = ContextDrafter()
    d.begin([1, 10, 11, 12, 50], suffix=[11, 12, 13, 14, 11, 12, 99])
    # pending 12 after "... 50": (50, 12) unseen anywhere; 1-gram 12: text has it followed by 50,
    # the suffix first at 2 followed by 13 - a tie in length goes to the suffix, the first occurrence
    m = d.lookup(12)
    assert m == Match(1, (13, 14, 11, 12, 99), "suffix")
    d.accept([12, 11])
    # text "... 50 12 11", pending 12: the 2-gram (11, 12) is in both, neither longer: the suffix's
    assert d.lookup(12) == Match(2, (13, 14, 11, 12, 99), "suffix")
    d.accept([12, 13])  # text "... 11 12 13", pending 14: (11, 12, 13, 14) only in the suffix
    assert d.lookup(14) == Match(4, (11, 12, 99), "suffix")
    d2 = ContextDrafter()
    d2.begin([1, 2, 3], suffix=[4, 5, 6, 7])
    assert d2.lookup(4) == Match(1, (5, 6, 7), "suffix")
    assert d2.lookup(7) is None  # the last suffix token has no continuation


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
        assert grown.lookup(pending) == fresh.lookup(pending)
    assert grown.text == text


def test_empty_and_tiny_texts() -> None:
    d = ContextDrafter()
    d.begin([])
    assert d.lookup(3) is None
    d.accept([3])
    assert d.lookup(3) is None  # a token with nothing after it yet
    d.accept([3])
    assert d.lookup(3) == Match(1, (3,) * d.max_draft, "text")  # "3 3" then 3: the run continues


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
                assert reused.lookup(pending) == fresh.lookup(pending)


def test_propose_fills_the_draft_with_the_match_and_one_hot_positions() -> None:
    d = ContextDrafter(max_draft=4)
    d.begin([1, 5, 6, 7, 8, 9, 2, 6, 7, 3])
    draft = Draft(8)
    d.propose(5, 3, draft)  # room for 3 of the 4 tokens that followed 5
    assert draft.tokens[: draft.n].tolist() == [6, 7, 8]
    assert draft.sources == [DraftSource.CONTEXT] * 3 and draft.q == [None] * 3  # deterministic: q one-hot
    assert draft.match == Match(1, (6, 7, 8, 9), "text")
    draft.clear()
    d.propose(4, 3, draft)  # never seen: nothing, and no evidence
    assert draft.n == 0 and draft.match is None
