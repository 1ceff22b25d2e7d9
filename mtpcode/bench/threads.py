"""A/B: does verifying on more threads than the steps use pay in the decoding loop?

    python -m mtpcode.bench.threads --prompts editing --repeat 3 --batch-threads 2 \\
        --json docs/results/ab-threads-batch.json

Two engines on the same bundle, one thread for one-row steps each, and 1 or N
threads for forwards of several rows (``threads_batch``). Both run plain
decoding and the default configuration (heads + context drafts) on the same
prompts, alternated in one process, so that drift of a shared machine hits
both alike. Before that, isolated forwards: a 1,000-token prefill and 1- and
8-row forwards after it, on an idle machine and with another process keeping
one core busy. Writes everything as JSON.

docs/runtime.md, *Threads for verification*, has the results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from mtpcode.bench.measure import cpu_name, isolated_forwards, median
from mtpcode.bench.run import BenchConfig, engine_run, heads_config, prompt_set
from mtpcode.errors import run_script
from mtpcode.files import atomic_write_text
from mtpcode.runtime import Engine

PROG = "python -m mtpcode.bench.threads"


def isolated(model: str, counts: Sequence[int]) -> dict[str, dict[str, float]]:
    """:func:`~mtpcode.bench.measure.isolated_forwards` at each ``threads_batch`` of ``counts``,
    on an idle machine and with a busy-looping process on one core."""
    out: dict[str, dict[str, float]] = {}
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for tb in counts:
                out[f"{'busy' if busy else 'idle'}/threads_batch_{tb}"] = isolated_forwards(model + "/main.gguf", tb)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    return out


def alternated(engines: dict[int, Engine], args: argparse.Namespace) -> dict[str, Any]:
    """Plain and default decoding on every prompt with each engine in turn: seconds per token, and
    the share of forwards that verified drafts."""
    prompts = prompt_set(args.prompts, 8)
    configs = {"plain": BenchConfig("plain"), "default": heads_config(engines[1].n_heads, context=True)}
    for engine in engines.values():  # warm-up
        engine_run(engine, prompts[0], engine.tokenize(prompts[0].text), configs["default"], 16, True)
    per_token: dict[str, list[float]] = {f"{tb}/{c}": [] for tb in engines for c in configs}
    drafted = {tb: 0 for tb in engines}
    forwards = {tb: 0 for tb in engines}
    for _ in range(args.repeat):
        for prompt in prompts:
            for tb, engine in engines.items():
                ids = engine.tokenize(prompt.text)
                for name, config in configs.items():
                    _, stats = engine_run(engine, prompt, ids, config, args.max_tokens, True)
                    per_token[f"{tb}/{name}"].append(stats.decode_s / max(1, stats.generated_tokens - 1))
                    if name == "default":
                        drafted[tb] += stats.main_forwards - stats.forwards_by_source.get("plain", 0)
                        forwards[tb] += stats.main_forwards
    out: dict[str, Any] = {"seconds_per_token": per_token}
    for tb in engines:
        plain, default = per_token[f"{tb}/plain"], per_token[f"{tb}/default"]
        out[f"threads_batch_{tb}"] = {
            "default_vs_plain_median": round(median([p / d for p, d in zip(plain, default)]), 4),
            "plain_ms_per_token_median": round(1e3 * median(plain), 4),
            "share_of_forwards_drafting": round(drafted[tb] / max(1, forwards[tb]), 4),
        }
    return out


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--model", default="mtpcode/builtin", help="bundle directory [default: mtpcode/builtin]")
    ap.add_argument("--prompts", default="editing", help="prompt set or file (as mtpcode bench --prompts)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-threads", type=int, default=2, help="threads_batch of the second engine")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--json", required=True, help="write the results here")
    args = ap.parse_args(argv)
    counts = (1, args.batch_threads)
    result: dict[str, Any] = {
        "command": f"{PROG} " + " ".join(argv), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_name(), "model": args.model, "prompts": args.prompts, "repeat": args.repeat,
        "max_tokens": args.max_tokens, "threads": 1,
        "isolated_forwards": isolated(args.model, counts),
    }
    for key, value in result["isolated_forwards"].items():
        print(f"{key}: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in value.items()))
    engines = {tb: Engine(args.model, n_ctx=4096, n_threads=1, n_threads_batch=tb) for tb in counts}
    try:
        result.update(alternated(engines, args))
    finally:
        for engine in engines.values():
            engine.close()
    for tb in counts:
        r = result[f"threads_batch_{tb}"]
        print(f"threads_batch={tb}: default vs plain {r['default_vs_plain_median']:.3f}x, "
              f"{r['share_of_forwards_drafting']:.1%} of forwards drafting")
    atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_script(main, PROG)
