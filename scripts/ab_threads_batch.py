"""A/B: does verifying on more threads than the steps use pay in the decoding loop?

Two engines on the same bundle, one thread for one-row steps each, and 1 or N
threads for forwards of several rows (``threads_batch``). Both run plain
decoding and the default configuration (heads + context drafts) on the same
prompts, alternated in one process, so that drift of a shared machine hits
both alike. Before that, isolated forwards: a 1,000-token prefill and 1- and
8-row forwards after it, on an idle machine and with another process keeping
one core busy. Writes everything as JSON.

    python scripts/ab_threads_batch.py --prompts editing --repeat 3 --batch-threads 2 \\
        --json docs/results/ab-threads-batch.json

docs/runtime.md, *Threads for verification*, has the results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from mtpcode.bench.measure import cpu_name, median
from mtpcode.bench.run import BenchConfig, _engine_run, heads_config, prompt_set
from mtpcode.files import atomic_write_text
from mtpcode.llama import Context, Model, init_backend
from mtpcode.runtime import Engine


def isolated_forwards(model_path: str, threads_batch: int, repeat: int = 40) -> dict[str, float]:
    """A 1,000-token prefill, then 1- and 8-row forwards after it (graph reused), median seconds."""
    init_backend()
    rng = np.random.default_rng(0)
    with Model(model_path) as model, Context(model, n_ctx=2048, n_batch=512, n_threads=1,
                                             n_threads_batch=threads_batch) as ctx:
        ids = rng.integers(3, model.n_vocab, 1000)
        prefill = []
        for _ in range(5):
            ctx.trim(0)
            t = time.perf_counter()
            for pos in range(0, 1000, 500):
                ctx.batch.token_ids[:500] = ids[pos: pos + 500]
                ctx.decode(500, pos, last_logits_only=True)
            prefill.append(time.perf_counter() - t)
        rows: dict[int, list[float]] = {1: [], 8: []}
        for _ in range(repeat):
            for b in rows:
                for i in range(2):  # the second of two same-shape forwards: the graph is reused
                    ctx.batch.token_ids[:b] = rng.integers(3, model.n_vocab, b)
                    t = time.perf_counter()
                    ctx.decode(b, 1000, last_logits_only=False)
                    if i:
                        rows[b].append(time.perf_counter() - t)
                    ctx.trim(1000)
    return {"prefill_1000_s": round(median(prefill), 6), "rows_1_s": round(median(rows[1]), 6),
            "rows_8_s": round(median(rows[8]), 6), "rows_8_worst_s": round(max(rows[8]), 6)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mtpcode/builtin")
    ap.add_argument("--prompts", default="editing")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    prompts = prompt_set(args.prompts, 8)
    counts = (1, args.batch_threads)
    engines = {tb: Engine(args.model, n_ctx=4096, n_threads=1, n_threads_batch=tb) for tb in counts}
    configs = {"plain": BenchConfig("plain"), "default": heads_config(engines[1].n_heads, context=True)}
    isolated: dict[str, dict[str, float]] = {}
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for tb in counts:
                key = f"{'busy' if busy else 'idle'}/threads_batch_{tb}"
                isolated[key] = isolated_forwards(args.model + "/main.gguf", tb)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    for key, value in isolated.items():
        print(f"{key}: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in value.items()))
    for engine in engines.values():  # warm-up
        _engine_run(engine, prompts[0], engine.tokenize(prompts[0].text), configs["default"], 16, True)
    per_token: dict[str, list[float]] = {f"{tb}/{c}": [] for tb in counts for c in configs}
    drafted: dict[str, int] = {f"{tb}/default": 0 for tb in counts}
    forwards: dict[str, int] = {f"{tb}/default": 0 for tb in counts}
    for _ in range(args.repeat):
        for prompt in prompts:
            for tb, engine in engines.items():
                ids = engine.tokenize(prompt.text)
                for name, config in configs.items():
                    _, stats = _engine_run(engine, prompt, ids, config, args.max_tokens, True)
                    per_token[f"{tb}/{name}"].append(stats.decode_s / max(1, stats.generated_tokens - 1))
                    if name == "default":
                        drafted[f"{tb}/default"] += stats.main_forwards - stats.forwards_by_source.get("plain", 0)
                        forwards[f"{tb}/default"] += stats.main_forwards
    result = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu_name(), "model": args.model,
        "prompts": args.prompts, "repeat": args.repeat, "max_tokens": args.max_tokens, "threads": 1,
        "isolated_forwards": isolated, "seconds_per_token": per_token,
    }
    for tb in counts:
        plain, default = per_token[f"{tb}/plain"], per_token[f"{tb}/default"]
        result[f"threads_batch_{tb}"] = {
            "default_vs_plain_median": round(median([p / d for p, d in zip(plain, default)]), 4),
            "plain_ms_per_token_median": round(1e3 * median(plain), 4),
            "share_of_forwards_drafting": round(drafted[f"{tb}/default"] / max(1, forwards[f"{tb}/default"]), 4),
        }
        print(f"threads_batch={tb}: default vs plain {result[f'threads_batch_{tb}']['default_vs_plain_median']:.3f}x, "
              f"{result[f'threads_batch_{tb}']['share_of_forwards_drafting']:.1%} of forwards drafting")
    atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
