"""The A/B summary of two checkouts' benchmark runs (mtpcode.bench.ab), on hand-made runs."""

from __future__ import annotations

from typing import Any

from mtpcode.bench import ab


def run(r: int, side: str, plain: float, heads: float) -> dict[str, Any]:
    return {"round": r, "side": side, "prompts": "general",
            "summary": {"plain": {"speedup": 1.0, "speedup_cpu": 1.0, "decode_tokens_per_s": plain},
                        "3 heads": {"speedup": heads / plain, "speedup_cpu": heads / plain,
                                    "decode_tokens_per_s": heads},
                        "_greedy_identical": True}}


def test_new_over_old_pairs_each_round_and_takes_the_median() -> None:
    runs = [run(0, "old", 1000, 900), run(0, "new", 1100, 900),
            run(1, "new", 1200, 990), run(1, "old", 1000, 1000),
            run(2, "old", 800, 800), run(2, "new", 800, 880)]
    ratios = ab.compare(runs)["general"]
    assert ratios["plain"] == {"per_round": [1.1, 1.2, 1.0], "median": 1.1}
    assert ratios["3 heads"] == {"per_round": [1.0, 0.99, 1.1], "median": 1.0}
    summary = ab.summarize(runs)
    # a faster plain decoding lowers the new side's speedup over its own plain decoding
    new, old = summary["new"]["general"]["3 heads"], summary["old"]["general"]["3 heads"]
    assert new["median_speedup"] < old["median_speedup"]
    assert "new/old tok/s 1.100" in ab.table(summary, ab.compare(runs))
