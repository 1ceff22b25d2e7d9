"""Measurements behind docs/runtime.md (not a test; run by hand).

    python tests/runtime_bench.py build OUT_DIR [QUANT...]     synthetic dim-1024 bundles
    python tests/runtime_bench.py forward-cost BUNDLE...        main forward by rows, extra_bufts on/off
    python tests/runtime_bench.py python-time BUNDLE...         per-forward Python vs llama.cpp time
    python tests/runtime_bench.py agreement BUNDLE...           quantized greedy agreement
    python tests/runtime_bench.py policies BUNDLE...            plain decode speed per extra_bufts policy

All runs use one llama.cpp thread: the CI machines have two cores shared with
other jobs, and a second thread mostly measures the neighbours. Times are the
minimum over repetitions (the least disturbed run), except python-time, which
reports medians of Stats fields.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

from mtpcode.bench.measure import common_prefix

PROMPTS = [
    "def main():\n    ",
    "import os\nimport sys\n",
    "x = [i * 2 for i in range(10)]\n",
    "class Stack:\n    def push(self, item):\n",
    "for line in open(path):\n",
]


def build(out_dir: str, *quants: str) -> None:
    """A random dim-1024, 10-layer, 4-future-token checkpoint converted to each quantization."""
    from converters.convert import convert_checkpoint
    from converters.synthetic import make_checkpoint, train_tokenizer

    root = Path(out_dir)
    tok = root / "tokenizer.model"
    if not tok.exists():
        train_tokenizer(tok, 512)
    ckpt = root / "ckpt-dim1024"
    if not ckpt.exists():
        make_checkpoint(ckpt, tok, multiple_of=256, dim=1024, n_layers=10, n_heads=16, n_future_tokens=4)
    for q in quants or ("F16", "Q8_0", "Q4_0", "Q4_K_M"):
        out = root / f"dim1024-{q.lower()}"
        if not out.exists():
            convert_checkpoint(ckpt, out, quant=q, threads=2)
        print(out)


def forward_cost(*bundles: str) -> None:
    """Main forward of 1..8 rows and one head forward, with extra buffer types on and off."""
    from mtpcode.generation import GenerationOptions
    from mtpcode.runtime import Engine

    for bundle in bundles:
        for policy in ("on", "off"):
            with Engine(bundle, n_ctx=512, n_threads=1, extra_bufts=policy) as e:
                list(e.generate("def main():\n    x = 1\n", GenerationOptions(max_tokens=2, heads=3)))
                main, pos = e._main, e._n_main
                cost = {}
                for rows in (1, 2, 3, 4, 5, 8):
                    times = []
                    for _ in range(15):
                        main.batch.tokens[:rows] = 100
                        t = time.perf_counter()
                        main.decode(rows, pos, last_logits_only=False)
                        times.append(time.perf_counter() - t)
                        main.trim(pos)
                    cost[rows] = min(times) * 1e3
                head, hpos = e._heads[0], e._n_head[0]
                times = []
                for _ in range(15):
                    head.trim(hpos - 1)
                    head.batch.embd[:1] = e._trunk[hpos - 1]
                    t = time.perf_counter()
                    head.decode(1, hpos - 1, last_logits_only=True)
                    times.append(time.perf_counter() - t)
                ratios = " ".join(f"{r}:{cost[r] / cost[1]:.2f}x" for r in (2, 3, 4, 5, 8))
                print(f"{Path(bundle).name:16s} extra_bufts={policy:3s} 1 row {cost[1]:6.2f} ms  {ratios}  "
                      f"head {min(times) * 1e3:.2f} ms")


def python_time(*bundles: str) -> None:
    """Median per main forward of decode time and of the part spent in Python (Stats.python_s)."""
    from mtpcode.generation import GenerationOptions
    from mtpcode.runtime import Engine

    for bundle in bundles:
        with Engine(bundle, n_ctx=512, n_threads=1) as e:
            for heads in (0, e.n_heads):
                rows = []
                for rep in range(5):
                    opts = GenerationOptions(max_tokens=64, heads=heads, adaptive=False)
                    st = list(e.generate(PROMPTS[rep % len(PROMPTS)], opts))[-1].stats
                    rows.append((st.decode_s / st.main_forwards * 1e3, st.python_s / st.main_forwards * 1e3))
                total, py = (statistics.median(c) for c in zip(*rows))
                print(f"{Path(bundle).name:16s} heads={heads}: {total:6.2f} ms/forward, "
                      f"Python {py:.3f} ms/forward ({py / total:.0%})")


def agreement(*bundles: str) -> None:
    """Tokens before the first divergence, speculative (all heads) vs plain, cold engines, 64 tokens/prompt."""
    from mtpcode.generation import Done, GenerationOptions
    from mtpcode.runtime import Engine

    def gen(bundle: str, prompt: str, heads: int) -> list[int]:
        with Engine(bundle, n_ctx=512, n_threads=1) as e:
            opts = GenerationOptions(max_tokens=64, heads=heads, adaptive=False)
            return [t for ev in e.generate(prompt, opts) if not isinstance(ev, Done) for t in ev.token_ids]

    for bundle in bundles:
        agreed = total = 0
        points = []
        for prompt in PROMPTS:
            plain, spec = gen(bundle, prompt, 0), gen(bundle, prompt, 3)
            n = common_prefix(plain, spec)
            agreed += n
            total += len(plain)
            points.append(str(n) if n < len(plain) else "-")
        print(f"{Path(bundle).name:16s} agreement {agreed}/{total} = {agreed / total:.1%} "
              f"(first divergence per prompt: {' '.join(points)})")


def policies(*bundles: str) -> None:
    """Plain decoding time per token under each extra_bufts policy (minimum of 3 generations of 32 tokens)."""
    from mtpcode.generation import Done, GenerationOptions
    from mtpcode.runtime import Engine

    for bundle in bundles:
        for policy in ("on", "off", "repack"):
            with Engine(bundle, n_ctx=256, n_threads=1, extra_bufts=policy) as e:
                first = [t for ev in e.generate(PROMPTS[0], GenerationOptions(max_tokens=32, heads=0))
                         if not isinstance(ev, Done) for t in ev.token_ids]
                per_token = []
                for i in range(3):
                    st = list(e.generate(f"x = {i}\n", GenerationOptions(max_tokens=32, heads=0)))[-1].stats
                    per_token.append(st.decode_s / st.main_forwards)
                print(f"{Path(bundle).name:16s} extra_bufts={policy:6s} repacked={e._main_model.repacked!s:5s} "
                      f"{min(per_token) * 1e3:6.2f} ms/token  first tokens {first[:6]}")


if __name__ == "__main__":
    commands = {"build": build, "forward-cost": forward_cost, "python-time": python_time, "agreement": agreement,
                "policies": policies}
    if len(sys.argv) < 3 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    np.seterr(all="ignore")
    commands[sys.argv[1]](*sys.argv[2:])
