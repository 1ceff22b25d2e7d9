"""Measurements behind docs/runtime.md, one subcommand each:

    python -m mtpcode.bench.probe build OUT_DIR [QUANT...]                   synthetic dim-1024 bundles
    python -m mtpcode.bench.probe forward-cost --json FILE BUNDLE...        main forward by rows, extra_bufts on/off
    python -m mtpcode.bench.probe python-time --json FILE BUNDLE...         per-forward Python vs llama.cpp time
    python -m mtpcode.bench.probe agreement --json FILE BUNDLE...           quantized greedy agreement
    python -m mtpcode.bench.probe policies --json FILE BUNDLE...            plain decode speed per extra_bufts policy

All runs use one llama.cpp thread: the CI machines have two cores shared with
other jobs, and a second thread mostly measures the neighbours. Times are the
minimum over repetitions (the least disturbed run), except python-time, which
reports medians of Stats fields. Each measuring subcommand prints a line per
bundle and writes the figures, with the CPU and the command, to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtpcode.bench.measure import common_prefix, cpu_name, measure_costs, median
from mtpcode.bundle import open_bundle
from mtpcode.errors import MtpError, run_script
from mtpcode.files import atomic_write_text
from mtpcode.generation import Done, GenerationOptions, Stats

PROG = "python -m mtpcode.bench.probe"
PROMPTS = [
    "def main():\n    ",
    "import os\nimport sys\n",
    "x = [i * 2 for i in range(10)]\n",
    "class Stack:\n    def push(self, item):\n",
    "for line in open(path):\n",
]


def build(out_dir: str, quants: Sequence[str]) -> None:
    """A random dim-1024, 10-layer, 4-future-token checkpoint converted to each quantization."""
    # torch and sentencepiece: only this subcommand needs them
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


def forward_cost(bundles: Sequence[str]) -> list[dict[str, Any]]:
    """Main forward of 1..8 rows after a 16-token prefix and one head forward, with extra buffer types
    on and off (:func:`~mtpcode.bench.measure.measure_costs`, the fastest of 15 runs of each)."""
    rows = []
    for bundle in bundles:
        for policy in ("on", "off"):
            c = measure_costs(Path(bundle), mode=policy, max_batch=8, repeat=15, threads=1, prefix=16)
            rel = c["verify_min_rel"]
            ratios = " ".join(f"{b}:{rel[str(b)]:.2f}x" for b in (2, 3, 4, 5, 8))
            print(f"{Path(bundle).name:16s} extra_bufts={policy:3s} 1 row {1e3 * c['verify_min_s']['1']:6.2f} ms  "
                  f"{ratios}  head {1e3 * c['head_min_s']:.2f} ms")
            rows.append({"bundle": bundle, "extra_bufts": policy, "verify_min_s": c["verify_min_s"],
                         "verify_min_rel": rel, "head_min_s": c["head_min_s"], "prefix_tokens": c["prefix_tokens"],
                         "capture_overhead_s": c["capture_overhead_s"]})
    return rows


def python_time(bundles: Sequence[str]) -> list[dict[str, Any]]:
    """Median per main forward of decode time and of the part spent in Python (Stats.python_s)."""
    from mtpcode.runtime import Engine  # the runtime and llama_cpp: not for build

    rows = []
    for bundle in bundles:
        with Engine(bundle, n_ctx=512, n_threads=1) as e:
            for heads in (0, e.n_heads):
                per_forward = []
                for rep in range(5):
                    opts = GenerationOptions(max_tokens=64, heads=heads, adaptive=False)
                    st = _stats(e.generate(PROMPTS[rep % len(PROMPTS)], opts))
                    per_forward.append((st.decode_s / st.main_forwards * 1e3, st.python_s / st.main_forwards * 1e3))
                total, py = (median(c) for c in zip(*per_forward))
                print(f"{Path(bundle).name:16s} heads={heads}: {total:6.2f} ms/forward, "
                      f"Python {py:.3f} ms/forward ({py / total:.0%})")
                rows.append({"bundle": bundle, "heads": heads, "ms_per_forward": round(total, 4),
                             "python_ms_per_forward": round(py, 4)})
    return rows


def agreement(bundles: Sequence[str]) -> list[dict[str, Any]]:
    """Tokens before the first divergence, speculative (all heads) vs plain, cold engines, 64 tokens/prompt."""
    from mtpcode.runtime import Engine  # the runtime and llama_cpp: not for build

    def gen(bundle: str, prompt: str, heads: int) -> list[int]:
        with Engine(bundle, n_ctx=512, n_threads=1) as e:
            opts = GenerationOptions(max_tokens=64, heads=heads, adaptive=False)
            return [t for ev in e.generate(prompt, opts) if not isinstance(ev, Done) for t in ev.token_ids]

    rows = []
    for bundle in bundles:
        agreed = total = 0
        points: list[int | None] = []
        for prompt in PROMPTS:
            plain, spec = gen(bundle, prompt, 0), gen(bundle, prompt, 3)
            n = common_prefix(plain, spec)
            agreed += n
            total += len(plain)
            points.append(n if n < len(plain) else None)
        print(f"{Path(bundle).name:16s} agreement {agreed}/{total} = {agreed / total:.1%} (first divergence per "
              f"prompt: {' '.join('-' if p is None else str(p) for p in points)})")
        rows.append({"bundle": bundle, "agreed_tokens": agreed, "plain_tokens": total,
                     "first_divergence_per_prompt": points})
    return rows


def repacked(bundle: str, policy: str) -> bool:
    """Whether this llama.cpp build puts the bundle's block weights in CPU_REPACK under the engine's
    ``extra_bufts`` policy: a model loaded here as the engine loads its main model."""
    from mtpcode.llama import Model, repack_pattern, use_extra_bufts  # llama_cpp: not for build

    if policy != "repack":
        return False
    main = open_bundle(bundle).main_path
    pattern = repack_pattern(main)
    if not pattern:
        return False
    with Model(main, extra_bufts=use_extra_bufts(policy), repack=pattern) as model:
        return model.repacked


def policies(bundles: Sequence[str]) -> list[dict[str, Any]]:
    """Plain decoding time per token under each extra_bufts policy (minimum of 3 generations of 32 tokens)."""
    from mtpcode.runtime import Engine  # the runtime and llama_cpp: not for build

    rows = []
    for bundle in bundles:
        for policy in ("on", "off", "repack"):
            with Engine(bundle, n_ctx=256, n_threads=1, extra_bufts=policy) as e:
                first = [t for ev in e.generate(PROMPTS[0], GenerationOptions(max_tokens=32, heads=0))
                         if not isinstance(ev, Done) for t in ev.token_ids]
                per_token = []
                for i in range(3):
                    st = _stats(e.generate(f"x = {i}\n", GenerationOptions(max_tokens=32, heads=0)))
                    per_token.append(st.decode_s / st.main_forwards)
                extra = e.extra_bufts
            rp = repacked(bundle, policy)
            print(f"{Path(bundle).name:16s} extra_bufts={policy:6s} repacked={rp!s:5s} "
                  f"{min(per_token) * 1e3:6.2f} ms/token  first tokens {first[:6]}")
            rows.append({"bundle": bundle, "policy": policy, "extra_bufts": extra, "repacked": rp,
                         "ms_per_token": round(min(per_token) * 1e3, 4), "first_tokens": first[:6]})
    return rows


def _stats(events: Iterable[object]) -> Stats:
    """The Stats of a generation's closing Done event."""
    done = [ev for ev in events if isinstance(ev, Done)]
    if not done:
        raise MtpError("a generation ended without its Done event")
    return done[-1].stats


# subcommand -> (what it measures, the function)
MEASURES = {
    "forward-cost": ("main forward by rows, extra_bufts on/off", forward_cost),
    "python-time": ("per-forward Python vs llama.cpp time", python_time),
    "agreement": ("quantized greedy agreement", agreement),
    "policies": ("plain decode speed per extra_bufts policy", policies),
}


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description="Measurements behind docs/runtime.md, one subcommand each.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = sub.add_parser("build", help="synthetic dim-1024 bundles, one per quantization")
    b.add_argument("out_dir")
    b.add_argument("quants", nargs="*", metavar="QUANT", help="default: F16 Q8_0 Q4_0 Q4_K_M")
    for name, (what, _) in MEASURES.items():
        p = sub.add_parser(name, help=what)
        p.add_argument("--json", required=True, help="write the figures here")
        p.add_argument("bundles", nargs="+", metavar="BUNDLE")
    args = ap.parse_args(argv)
    np.seterr(all="ignore")
    if args.command == "build":
        build(args.out_dir, args.quants)
        return 0
    rows = MEASURES[args.command][1](args.bundles)
    doc = {"command": f"{PROG} " + " ".join(argv), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "cpu": cpu_name(), "threads": 1, "results": rows}
    atomic_write_text(Path(args.json), json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_script(main, PROG)
