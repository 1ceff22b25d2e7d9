"""Throughput of concurrent greedy requests over HTTP, against the ceiling the batched forward allows.

``python -m mtpcode.bench.throughput --out docs/results/throughput-4.json``

``mtpcode serve --http`` (its default slots) on the built-in model serves N
different greedy ``/completion`` requests (held-out standard-library
snippets, ``--tokens`` tokens each, the repeat stop off so that each runs to
its length). Per configuration (``plain``: ``--heads 0``; ``drafting``: the
default drafting), after a warm-up that leaves each prompt cached in a slot:

* alone: each request by itself, one after the other; tokens/s from the
  response's timings (generated tokens / decoding time) and from the client's
  wall clock;
* together: the N requests sent at once; total tokens / the wall time from the
  first request sent to the last answer. Each answer must equal the same
  request's answer alone.

The ceiling comes from the forwards themselves, timed in this process after
the server has stopped: one llama.cpp context on the same ``main.gguf`` with N
sequences in one unified cache (as the engine makes it), each holding its
prompt and half its output; a forward carrying one row of each of the N
sequences against one sequence's one-row forward, interleaved, each the
second of two of its shape (llama.cpp reuses its graph, as in decoding).
ceiling = N / (cost of the N-row forward / cost of the 1-row one) × the
tokens/s alone; the figure of merit is the together tokens/s over it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mtpcode.bench.measure import cpu_name, median
from mtpcode.bench.typists import MODEL_NAME, Server, free_port
from mtpcode.files import atomic_write_text
from mtpcode.models import builtin_model_path

REPO = Path(__file__).resolve().parents[2]
# The configurations served: the extra `mtpcode serve` options of each.
CONFIGS: dict[str, list[str]] = {"plain": ["--heads", "0"], "drafting": []}


# --- requests ----------------------------------------------------------------------------------------


def request_body(prompt: str, tokens: int) -> dict[str, Any]:
    """A greedy, unstreamed /completion of ``tokens`` tokens naming an arbitrary model."""
    return {"prompt": prompt, "n_predict": tokens, "temperature": 0, "model": MODEL_NAME}


def answer_record(obj: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """What a /completion answer tells of its request."""
    t = obj.get("timings") or {}
    return {"content": obj.get("content", ""), "tokens": int(obj.get("tokens_predicted", 0)),
            "stop_type": obj.get("stop_type"), "prompt_tokens": obj.get("tokens_evaluated"),
            "prompt_n": t.get("prompt_n"), "predicted_ms": t.get("predicted_ms"),
            "predicted_per_second": t.get("predicted_per_second"), "tokens_per_forward": t.get("tokens_per_forward"),
            "slot": obj.get("id_slot"), "wall_s": round(wall_s, 4)}


async def _post(client: Any, prompt: str, tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = await client.post("/completion", json=request_body(prompt, tokens))
    r.raise_for_status()
    return answer_record(r.json(), time.perf_counter() - t0)


async def _alone(url: str, prompts: list[str], tokens: int) -> list[dict[str, Any]]:
    import httpx  # an optional dependency (mtpcode[test]): only the requests need it

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        return [await _post(client, p, tokens) for p in prompts]


async def _together(url: str, prompts: list[str], tokens: int) -> tuple[list[dict[str, Any]], float]:
    """Every prompt at once, each on its own connection; the answers and the seconds from the first
    request sent to the last answer."""
    import httpx  # an optional dependency (mtpcode[test]): only the requests need it

    clients = [httpx.AsyncClient(base_url=url, timeout=600) for _ in prompts]
    try:
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(_post(c, p, tokens) for c, p in zip(clients, prompts)))
        wall = time.perf_counter() - t0
    finally:
        for c in clients:
            await c.aclose()
    return list(answers), wall


def alone_rate(answers: list[dict[str, Any]]) -> dict[str, float]:
    """Tokens/s of requests run one at a time: from the servers' timings (tokens / decoding
    time) and from the client's wall clock."""
    tokens = sum(a["tokens"] for a in answers)
    decode_s = sum((a["predicted_ms"] or 0.0) for a in answers) / 1000
    wall = sum(a["wall_s"] for a in answers)
    return {"tokens": tokens, "timings_tokens_per_s": round(tokens / decode_s, 2) if decode_s else 0.0,
            "wall_tokens_per_s": round(tokens / wall, 2) if wall else 0.0}


def serve_config(name: str, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Start the server with configuration ``name``, warm it, then ``--repeat`` rounds of the
    requests alone and together; the raw answers and the rates."""
    port = free_port()
    cmd = [sys.executable, "-m", "mtpcode", "serve", "--http", "--port", str(port), "--threads", str(args.threads),
           "--ctx", str(args.ctx), "--no-repeat-stop", *CONFIGS[name]]
    if args.model:
        cmd += ["-m", args.model]
    server = Server(cmd, port, env={**os.environ, "PYTHONPATH": str(REPO), "MTPCODE_FLASH_ATTN": "false"}, cwd=REPO)
    rounds: list[dict[str, Any]] = []
    try:
        server.wait_ready("/health")
        # the warm-up: the requests together (each takes a slot of its own), then each alone (its
        # slot's cache is its prompt; the drafting policies have seen it)
        asyncio.run(_together(server.url, prompts, args.tokens))
        asyncio.run(_alone(server.url, prompts, args.tokens))
        for _ in range(args.repeat):
            alone = asyncio.run(_alone(server.url, prompts, args.tokens))
            together, wall = asyncio.run(_together(server.url, prompts, args.tokens))
            tokens = sum(a["tokens"] for a in together)
            rounds.append({
                "alone": alone, "together": together, "together_wall_s": round(wall, 4),
                **{f"alone_{k}": v for k, v in alone_rate(alone).items() if k != "tokens"},
                "together_tokens_per_s": round(tokens / wall, 2),
                "identical": [a["content"] == b["content"] and a["tokens"] == b["tokens"]
                              for a, b in zip(alone, together)],
            })
    finally:
        server.stop()
    return {"command": " ".join(["mtpcode serve --http", "--threads", str(args.threads), "--ctx", str(args.ctx),
                                 "--no-repeat-stop", *CONFIGS[name]]),
            "rounds": rounds}


# --- the ceiling: the forwards' costs ---------------------------------------------------------------


def forward_costs(main_gguf: Path, trunk_tensor: str, lengths: list[list[int]], *, n_ctx: int, threads: int,
                  repeat: int, flash_attn: bool = False) -> dict[str, Any]:
    """Seconds of one forward carrying one row of each sequence, and of one sequence's one-row
    forward, in one context of ``len(lengths)`` sequences (a unified cache, the engine's trunk
    capture installed and off, as plain decoding runs it; flash attention as ``flash_attn``, off
    like the servers measured); sequence i holds the tokens ``lengths[i]``. Interleaved: each
    repeat times one sequence's row (round robin) and all the rows, each the second of two
    forwards of its shape. Then, the other sequences removed, sequence 0's row again
    (``one_row_others_empty_s``: what the other sequences' cells cost a row)."""
    from mtpcode.llama import Context, Model, TrunkCapture  # llama.cpp: only this measurement loads it

    n_seq = len(lengths)
    n_batch = 512  # the engine's default
    rng = np.random.default_rng(0)
    with Model(main_gguf, extra_bufts=False) as model:
        capture = TrunkCapture(trunk_tensor, np.zeros((n_batch, model.n_embd), dtype=np.float32))
        with Context(model, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, n_threads_batch=threads,
                     capture=capture, n_seq=n_seq, flash_attn=flash_attn) as ctx:
            capture.active = False
            batch = ctx.batch
            for seq, ids in enumerate(lengths):  # fill each sequence, a batch at a time
                for pos in range(0, len(ids), n_batch):
                    chunk = ids[pos: pos + n_batch]
                    batch.clear()
                    row = batch.add(seq, pos, len(chunk), 1)
                    batch.token_ids[row: row + len(chunk)] = chunk
                    ctx.forward()
            ends = [len(ids) for ids in lengths]

            def timed(seqs: list[int]) -> float:
                dt = 0.0
                for _ in range(2):
                    batch.clear()
                    for s in seqs:
                        batch.token_ids[batch.add(s, ends[s], 1, 1)] = int(rng.integers(3, model.n_vocab))
                    t = time.perf_counter()
                    ctx.forward()
                    dt = time.perf_counter() - t
                    for s in seqs:
                        ctx.trim(ends[s], s)
                return dt

            everyone = list(range(n_seq))
            timed([0]), timed(everyone)  # a warm-up of both shapes
            one, many, ratios = [], [], []
            for r in range(repeat):
                t1 = timed([r % n_seq])
                tn = timed(everyone)
                one.append(t1)
                many.append(tn)
                ratios.append(tn / t1)
            # what the other sequences' cells cost a row: sequence 0 (filled first) alone in the cache
            for s in everyone[1:]:
                ctx.trim(0, s)
            timed([0])
            only = [timed([0]) for _ in range(max(1, repeat // 4))]
    return {"sequences": n_seq, "context_lengths": ends, "repeat": repeat, "threads": threads, "n_ctx": n_ctx,
            "flash_attn": flash_attn,
            "one_row_s": round(median(one), 7), "rows_s": round(median(many), 7),
            "one_row_others_empty_s": round(median(only), 7),
            "cost_ratio_of_medians": round(median(many) / median(one), 4),
            "cost_ratio": round(median(ratios), 4),
            "one_row_all_s": [round(x, 7) for x in one], "rows_all_s": [round(x, 7) for x in many]}


def ceiling_report(config: dict[str, Any], cost_ratio: float, n: int) -> dict[str, Any]:
    """The medians over the rounds of ``config``: tokens/s alone and together, the ceiling
    n / cost_ratio × alone (from the timings; from the wall clock beside it), the ratio to it."""
    rounds = config["rounds"]
    alone = median([r["alone_timings_tokens_per_s"] for r in rounds])
    alone_wall = median([r["alone_wall_tokens_per_s"] for r in rounds])
    together = median([r["together_tokens_per_s"] for r in rounds])
    ceiling = n / cost_ratio * alone
    ceiling_wall = n / cost_ratio * alone_wall
    return {
        "alone_tokens_per_s": round(alone, 2), "alone_wall_tokens_per_s": round(alone_wall, 2),
        "together_tokens_per_s": round(together, 2), "speedup_over_alone": round(together / alone, 3),
        "ceiling_speedup": round(n / cost_ratio, 3),
        "ceiling_tokens_per_s": round(ceiling, 2), "ratio_to_ceiling": round(together / ceiling, 3),
        "ceiling_wall_tokens_per_s": round(ceiling_wall, 2),
        "ratio_to_ceiling_wall": round(together / ceiling_wall, 3),
        "ratio_to_ceiling_per_round": [round(r["together_tokens_per_s"] / ceiling, 3) for r in rounds],
        "all_identical": all(all(r["identical"]) for r in rounds),
    }


def table(reports: dict[str, dict[str, Any]], cost_ratio: float) -> str:
    rows = ["| config | alone tok/s | together tok/s | cost ratio | ceiling tok/s (×) | ratio to ceiling | identical |",
            "|" + "---|" * 7]
    for name, r in reports.items():
        rows.append(f"| {name} | {r['alone_tokens_per_s']} | {r['together_tokens_per_s']} | {cost_ratio} | "
                    f"{r['ceiling_tokens_per_s']} ({r['ceiling_speedup']}×) | {r['ratio_to_ceiling']} | "
                    f"{r['all_identical']} |")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mtpcode.bench.throughput",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", help="bundle directory (default: the built-in model)")
    p.add_argument("--requests", type=int, default=4, help="concurrent requests (the server's default slots: 4)")
    p.add_argument("--tokens", type=int, default=128, help="tokens each request generates")
    p.add_argument("--prompt-chars", type=int, default=2000, help="the most characters of each prompt")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1: the built-in model's default)")
    p.add_argument("--ctx", type=int, default=4096, help="the server's context (its slots share it)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"from {', '.join(CONFIGS)}")
    p.add_argument("--repeat", type=int, default=3, help="rounds of alone + together per configuration")
    p.add_argument("--cost-repeat", type=int, default=400, help="timed pairs of forwards for the ceiling")
    p.add_argument("--out", type=Path, required=True, help="write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown configuration {unknown[0]!r} (choose from {', '.join(CONFIGS)})")
    if args.requests < 1 or args.tokens < 1 or args.repeat < 1 or args.cost_repeat < 1:
        p.error("--requests, --tokens, --repeat and --cost-repeat must be positive")
    from mtpcode.bench.run import default_prompts  # the bench's held-out snippets (reads the stdlib's files)
    from mtpcode.bundle import open_bundle
    from mtpcode.llama import Model  # llama.cpp: the tokenizer of the ceiling's sequences

    path = args.model or builtin_model_path()
    if path is None:
        raise SystemExit("this install has no built-in model: name a bundle with --model")
    bundle = open_bundle(path)
    prompts = default_prompts(args.requests, max_chars=args.prompt_chars)
    if len(prompts) < args.requests:
        raise SystemExit(f"only {len(prompts)} held-out snippets for {args.requests} requests")
    texts = [pr.text for pr in prompts]
    results = {}
    for name in configs:
        print(f"{name}: {args.requests} requests alone and together, {args.repeat} rounds ...", file=sys.stderr,
              flush=True)
        results[name] = serve_config(name, texts, args)
    # the sequences of the ceiling: each prompt and half its output (the mean length while it decodes)
    first = results[configs[0]]["rounds"][0]["alone"]
    with Model(bundle.main_path, extra_bufts=False) as model:
        ids = [model.tokenize(t) for t in texts]
    rng = np.random.default_rng(1)
    lengths = [i + rng.integers(3, bundle.manifest.n_vocab, a["tokens"] // 2).tolist() for i, a in zip(ids, first)]
    print("timing the forwards ...", file=sys.stderr, flush=True)
    costs = forward_costs(bundle.main_path, bundle.manifest.trunk_tensor, lengths, n_ctx=args.ctx,
                          threads=args.threads, repeat=args.cost_repeat)
    reports = {name: ceiling_report(results[name], costs["cost_ratio"], args.requests) for name in configs}
    print(table(reports, costs["cost_ratio"]))
    import llama_cpp  # its version, for the results

    data = {
        "command": "python -m mtpcode.bench.throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_name(), "cpus": os.cpu_count(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__,
        "model": "builtin" if args.model is None else args.model, "requests": args.requests, "tokens": args.tokens,
        "threads": args.threads, "ctx": args.ctx, "flash_attn": False, "repeat": args.repeat,
        "prompts": [{"name": pr.name, "chars": len(pr.text), "tokens": len(i)} for pr, i in zip(prompts, ids)],
        "forward_costs": costs,
        "summary": reports,
        "configs": results,
    }
    atomic_write_text(args.out, json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
