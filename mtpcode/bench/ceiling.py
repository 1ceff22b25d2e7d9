"""The most that drafting from the context could gain on a prompt set: its ceiling.

An oracle replays :class:`~mtpcode.drafters.context.ContextDrafter` over the plain
(greedy) output of each prompt, knowing at every token how many of the
drafter's tokens the main model would accept there, and picks the cheapest
sequence of steps through the output (dynamic programming over positions and
the shape of the last forward): a plain step costs the measured one-row
forward, a verify of ``k`` of those tokens the measured forward of ``1 + k``
rows, and any forward whose row count differs from the one before it the graph
rebuild (llama.cpp reuses its graph only for the same shape). The Python of
the loop is left out. No policy that
drafts from the same matches can beat it on this model, this machine and these
prompts, so a measured speedup well below the ceiling is the policy's to gain,
and a ceiling near 1 says the model copies too little or rows cost too much.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mtpcode.bench.costmodel import interpolate
from mtpcode.bench.measure import common_prefix, median
from mtpcode.drafters.context import ContextDrafter


def context_ceiling(prompt: Sequence[int], suffix: Sequence[int], tokens: Sequence[int],
                    verify_s: Mapping[int, float], rebuild_s: float = 0.0) -> dict[str, float]:
    """The oracle's speedup over plain decoding for one prompt's greedy ``tokens``.

    ``verify_s`` maps row counts (1 and up; others interpolated, the last segment
    continued) to forward seconds. Returns the speedup, the share of tokens the
    oracle takes from the context, and its tokens per forward."""
    steps = len(tokens) - 1  # after the first token, one plain forward per token
    if steps <= 0:
        return {"speedup": 1.0, "copied": 0.0, "tokens_per_forward": 1.0}
    # what the drafter proposes after each token: its index is the same however the text was committed
    drafter = ContextDrafter()
    drafter.begin(prompt, suffix)
    accept = []
    for i in range(steps):
        match = drafter.lookup(tokens[i])
        accept.append(common_prefix(match.tokens, tokens[i + 1:]) if match is not None else 0)
        drafter.accept(tokens[i: i + 1])
    one = verify_s[1]
    top = max(accept) + 1  # the most rows a forward can have
    forward = [0.0] + [interpolate(verify_s, rows) for rows in range(1, top + 1)]
    # cost[i][p]: the cheapest way from token i to the end when the last forward had p rows (a
    # forward of another shape rebuilds the graph first); how[i][p]: the drafts of its first step
    end = steps + 2  # (a verify that drafts up to the last token ends one past it)
    inf = float("inf")
    cost = [[0.0] * (top + 1) for _ in range(end)]
    how = [[0] * (top + 1) for _ in range(end)]
    for i in range(steps - 1, -1, -1):
        row, choice = cost[i], how[i]
        for p in range(1, top + 1):
            best, best_k = inf, 0
            for k in range(0, accept[i] + 1):
                rows = k + 1
                c = forward[rows] + (rebuild_s if rows != p else 0.0) + cost[i + 1 + k][rows]
                if c < best:
                    best, best_k = c, k
            row[p], choice[p] = best, best_k
    i, p, forwards, copied = 0, 1, 0, 0
    while i < steps:
        k = how[i][p]
        copied += k
        i, p = i + 1 + k, k + 1
        forwards += 1
    return {"speedup": round(steps * one / cost[0][1], 4), "copied": round(copied / steps, 4),
            "tokens_per_forward": round(steps / forwards, 4)}


def ceiling_summary(per_prompt: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median speedup and copied share over prompts."""
    return {"median_speedup": round(median([p["speedup"] for p in per_prompt]), 4),
            "min_speedup": round(min(p["speedup"] for p in per_prompt), 4),
            "max_speedup": round(max(p["speedup"] for p in per_prompt), 4),
            "median_copied": round(median([p["copied"] for p in per_prompt]), 4)}
