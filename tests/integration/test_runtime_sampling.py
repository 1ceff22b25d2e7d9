"""Speculative sampling preserves the main model's distribution.

The exact law of the first three generated tokens is computed from
llama-cpp-python's logits (``Llama``, logits for every position) warped by
mtpcode.sampling.Warper; the engine then samples them many times with three
draft heads on a bundle whose heads are often accepted, and the empirical
total-variation distance must stay under a bound set from the exact law
itself (the 99.9% quantile of the TV of N i.i.d. draws, times 1.5).

The bound has power. This test, run with mtpcode.sampling patched to a wrong
rule (``python -c "import pytest, mtpcode.sampling as s; s.residual = ...;
pytest.main([...])"``): resampling from p instead of the residual after a
rejection gives TV 0.207 against the bound 0.082 (fails); accepting with
min(1, q/p) fails too; the correct rule gives TV 0.042 (N=2000).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtpcode import sampling
from mtpcode.generation import Done, GenerationOptions, SamplingOptions
from mtpcode.llama import reference_llama, use_extra_bufts
from mtpcode.runtime import Engine

PROMPT = "class A:\n"
TEMP, TOP_K, LENGTH = 1.5, 3, 3
N = 2000


def exact_law(main_gguf: Path, ids: list[int], opts: SamplingOptions) -> dict[tuple[int, ...], float]:
    """P(first LENGTH tokens) under the warped main model, by enumeration of the (top-k) tree."""
    # loaded with the engine's default weight buffers, so both compute alike on any CPU
    llm = reference_llama(main_gguf, extra_bufts=use_extra_bufts("auto"), n_ctx=128, n_threads=1, verbose=False,
                          logits_all=True)
    warper = sampling.Warper(llm.n_vocab(), opts)
    try:
        law: dict[tuple[int, ...], float] = {(): 1.0}
        for _ in range(LENGTH):
            nxt = {}
            for prefix, pr in law.items():
                llm.reset()
                llm.eval(ids + list(prefix))
                p = warper.probs(np.asarray(llm.eval_logits[-1], dtype=np.float32), warper.new_buffer())
                for t in np.flatnonzero(p):
                    nxt[prefix + (int(t),)] = pr * float(p[t])
            law = nxt
        return law
    finally:
        llm.close()


def test_speculative_sampling_matches_the_exact_distribution(agree_bundle) -> None:
    opts = SamplingOptions(temperature=TEMP, top_k=TOP_K)
    counts: dict[tuple[int, ...], int] = {}
    drafted = np.zeros(3, dtype=int)
    accepted = np.zeros(3, dtype=int)
    with Engine(agree_bundle, n_ctx=128, n_threads=1) as engine:
        ids = engine.tokenize(PROMPT)
        for seed in range(N):
            tokens: list[int] = []
            options = GenerationOptions(max_tokens=LENGTH + 1, heads=3, adaptive=False,
                                        sampling=SamplingOptions(temperature=TEMP, top_k=TOP_K, seed=seed))
            for ev in engine.generate(ids, options):
                if isinstance(ev, Done):
                    drafted += ev.stats.drafted_tokens
                    accepted += ev.stats.accepted_tokens
                else:
                    tokens += ev.token_ids
            key = tuple(tokens[:LENGTH])
            counts[key] = counts.get(key, 0) + 1
    law = exact_law(agree_bundle / "main.gguf", ids, opts)
    # the speculative paths were really taken: drafts of heads 1 and 2 accepted and rejected
    assert 0 < accepted[0] < drafted[0] and 0 < accepted[1] < drafted[1]
    keys = sorted(law)
    probs = np.array([law[k] for k in keys])
    rng = np.random.default_rng(0)
    null = [0.5 * np.abs(rng.multinomial(N, probs) / N - probs).sum() for _ in range(2000)]
    bound = 1.5 * float(np.quantile(null, 0.999))
    tv = 0.5 * sum(abs(counts.get(k, 0) / N - law.get(k, 0.0)) for k in set(counts) | set(law))
    assert set(counts) <= set(law), "sampled a sequence the warped main model cannot produce"
    print(f"TV {tv:.4f}, bound {bound:.4f}, accepted {accepted.tolist()} of {drafted.tolist()}")
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"
