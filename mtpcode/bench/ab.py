"""Two checkouts of mtpcode benchmarked alternately: did a change keep the speed?

``python -m mtpcode.bench.ab OLD_DIR NEW_DIR --out docs/results/ab-redesign.json``

Each checkout (a ``git worktree`` of a commit, with its C extension built:
``python setup.py build_ext --inplace`` in it) runs ``mtpcode bench`` in a
process of its own, with ``PYTHONPATH`` pointing at it; the two alternate,
round after round, for each prompt set, so that the machine's drift falls on
both alike. Reported per set and configuration: the median over rounds of
each run's median speedup over its own plain decoding (wall clock and CPU
time), the A/A control's (plain decoding run again), and ``Llama``'s; and
the new checkout's decoding speed over the old one's, round by round
(``new_over_old``: what a faster plain decoding does not hide; ``Llama``'s
ratio, the same code on both sides, is the noise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mtpcode.bench.measure import cpu_name, median
from mtpcode.files import atomic_write_text


def package_dir(checkout: Path) -> Path:
    """The mtpcode package a process started with PYTHONPATH=checkout imports (checked, not assumed)."""
    code = "import mtpcode, pathlib; print(pathlib.Path(mtpcode.__file__).parent)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(checkout)},
                         capture_output=True, text=True, check=True)
    found = Path(out.stdout.strip()).resolve()
    if found != (checkout / "mtpcode").resolve():
        raise SystemExit(f"PYTHONPATH={checkout} imports mtpcode from {found}, not from the checkout")
    return found


def run_bench(checkout: Path, prompts: str, args: argparse.Namespace) -> dict[str, Any]:
    """One ``mtpcode bench`` run of ``checkout``: its summary per configuration."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "mtpcode", "bench", "--prompts", prompts, "--repeat", str(args.repeat),
               "--n-prompts", str(args.n_prompts), "-n", str(args.max_tokens), "--no-costs", "-q", "--json", str(out)]
        env = {**os.environ, "PYTHONPATH": str(checkout), "MTPCODE_HOME": tmp}
        subprocess.run(cmd, env=env, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        doc = json.loads(out.read_text())
    return {config: {"speedup": s["median_speedup"], "speedup_cpu": s["median_speedup_cpu"],
                     "decode_tokens_per_s": s["median_decode_tokens_per_s"]}
            for config, s in doc["summary"].items()} | {"_greedy_identical": doc["greedy_identical"]}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per side, set and configuration: the medians over rounds, and each round's value."""
    out: dict[str, Any] = {}
    for run in runs:
        for config, values in run["summary"].items():
            if config.startswith("_"):
                continue
            entry = out.setdefault(run["side"], {}).setdefault(run["prompts"], {}).setdefault(
                config, {"speedup": [], "speedup_cpu": [], "decode_tokens_per_s": []})
            for key in entry:
                entry[key].append(values[key])
    for sides in out.values():
        for configs in sides.values():
            for entry in configs.values():
                for key in list(entry):
                    entry[f"median_{key}"] = round(median(entry[key]), 4)
    return out


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per set and configuration: new ÷ old decode tokens/s of each round, and their median."""
    by_key = {(run["round"], run["prompts"], run["side"]): run["summary"] for run in runs}
    out: dict[str, Any] = {}
    for (r, prompts, side), summary in by_key.items():
        old = by_key.get((r, prompts, "old"))
        if side != "new" or old is None:
            continue
        for config, values in summary.items():
            if config.startswith("_") or config not in old:
                continue
            ratios = out.setdefault(prompts, {}).setdefault(config, {"per_round": []})["per_round"]
            ratios.append(round(values["decode_tokens_per_s"] / old[config]["decode_tokens_per_s"], 4))
    for configs in out.values():
        for entry in configs.values():
            entry["median"] = round(median(entry["per_round"]), 4)
    return out


def table(summary: dict[str, Any], ratios: dict[str, Any]) -> str:
    lines = []
    sets = sorted({s for side in summary.values() for s in side})
    for prompts in sets:
        lines.append(f"prompts {prompts}: median speedup over the same checkout's plain decoding (CPU time)")
        configs = list(summary.get("new", {}).get(prompts, {}))
        for config in configs:
            cells = []
            for side in ("old", "new"):
                e = summary.get(side, {}).get(prompts, {}).get(config)
                cells.append(f"{e['median_speedup']:.3f}x ({e['median_speedup_cpu']:.3f}x)" if e else "-")
            ratio = ratios.get(prompts, {}).get(config)
            lines.append(f"  {config:20s} old {cells[0]:>18s}   new {cells[1]:>18s}"
                         + (f"   new/old tok/s {ratio['median']:.3f}" if ratio else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mtpcode.bench.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path, help="checkout of the old commit (git worktree, extension built)")
    p.add_argument("new", type=Path, help="checkout of the new commit")
    p.add_argument("--prompts", default="general,editing", help="prompt sets, comma-separated [general,editing]")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs both checkouts once per set [3]")
    p.add_argument("--repeat", type=int, default=3, help="mtpcode bench --repeat [3]")
    p.add_argument("--n-prompts", type=int, default=8, help="mtpcode bench --n-prompts [8]")
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="mtpcode bench -n [128]")
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    args = p.parse_args(argv)
    sides = {"old": args.old.resolve(), "new": args.new.resolve()}
    for checkout in sides.values():
        package_dir(checkout)
    commits = {side: subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() for side, path in sides.items()}
    runs = []
    t0 = time.time()
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")  # neither side always goes first
        for prompts in args.prompts.split(","):
            for side in order:
                print(f"round {r + 1}/{args.rounds}: {side} {prompts}", file=sys.stderr, flush=True)
                runs.append({"round": r, "side": side, "prompts": prompts,
                             "summary": run_bench(sides[side], prompts, args)})
    summary, ratios = summarize(runs), compare(runs)
    doc = {"schema": "mtpcode-ab/1", "cpu": cpu_name(), "commits": commits,
           "command": "python -m mtpcode.bench.ab " + " ".join(sys.argv[1:] if argv is None else argv),
           "bench_options": {"repeat": args.repeat, "n_prompts": args.n_prompts, "max_tokens": args.max_tokens},
           "seconds": round(time.time() - t0, 1), "summary": summary, "new_over_old": ratios, "runs": runs}
    atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    print(table(summary, ratios))


if __name__ == "__main__":
    main()
