"""Markdown tables from ``mtpcode bench --json`` results, for docs/PERFORMANCE.md.

    python -m mtpcode.bench.report docs/results/bench-builtin.json docs/results/bench-synthetic-7b.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtpcode.bench.run import ANCHOR, CONTROL, MODE_LABELS, PLAIN, SLOW_BAR, BenchConfig, bar_estimator
from mtpcode.errors import DataError, NoInputError, run_script

PROG = "python -m mtpcode.bench.report"


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def bench_markdown(doc: dict[str, Any]) -> str:
    configs = doc["configs"]
    specs = {key: BenchConfig(**doc["config_specs"][key]) for key in configs}
    spec = [c for c in configs if specs[c].speculative]
    bar_key = bar_estimator(doc["conditions"])
    out = []
    header = ["prompt", "prompt tok", "plain tok/s"] + (["plain again (A/A)"] if CONTROL.key in configs else [])
    for c in spec:
        header += [f"{c}: speedup (wall / CPU)", f"{c}: tok/fwd"]
    if ANCHOR.key in configs:
        header.append("llama.cpp tok/s")
    out += [_row(header), _row(["---"] * len(header))]
    for p in doc["prompts"]:
        cs = p["configs"]
        cells = [f"`{p['name']}`", p["prompt_tokens"], f"{cs[PLAIN.key]['decode_tokens_per_s']:.1f}"]
        if CONTROL.key in configs:
            cells.append(f"{cs[CONTROL.key]['speedup']:.2f}x / {cs[CONTROL.key]['speedup_cpu']:.2f}x")
        for c in spec:
            flag = f" **(<{SLOW_BAR})**" if cs[c][bar_key] < SLOW_BAR else ""
            cells += [f"{cs[c]['speedup']:.2f}x / {cs[c]['speedup_cpu']:.2f}x{flag}",
                      f"{cs[c]['tokens_per_forward']:.2f}"]
        if ANCHOR.key in configs:
            cells.append(f"{cs[ANCHOR.key]['decode_tokens_per_s']:.1f}")
        out.append(_row(cells))
    out.append("")
    header = ["configuration", "median speedup (wall)", "min (wall)", "median speedup (CPU)", "min (CPU)",
              "tokens/forward", "drafts/step", "acceptance per head",
              "decode tok/s (median)", "prefill tok/s", "Python ms/step", "llama.cpp ms/step"]
    out += [_row(header), _row(["---"] * len(header))]
    for c in configs:
        s = doc["summary"][c]
        name = {PLAIN.key: "plain", CONTROL.key: "plain again (A/A control)",
                ANCHOR.key: "llama-cpp-python `Llama`, greedy"}.get(c, c)
        acc = " / ".join(f"{a:.0%}" for a in s.get("acceptance", [])) or "-"
        out.append(_row([
            name, f"{s['median_speedup']:.2f}x", f"{s['min_speedup']:.2f}x",
            f"{s['median_speedup_cpu']:.2f}x", f"{s['min_speedup_cpu']:.2f}x",
            f"{s['tokens_per_forward']:.2f}" if "tokens_per_forward" in s else "1",
            f"{s['drafts_per_step']:.2f}" if "drafts_per_step" in s else "-", acc,
            f"{s['median_decode_tokens_per_s']:.1f}", f"{s['median_prefill_tokens_per_s']:.0f}",
            f"{s['python_ms_per_step']:.2f}" if "python_ms_per_step" in s else "-",
            f"{s['native_ms_per_step']:.2f}" if "native_ms_per_step" in s else "-",
        ]))
    out.append("")
    out.append(source_markdown(doc))
    return "\n".join(out)


def source_markdown(doc: dict[str, Any]) -> str:
    """Per configuration and kind of step: share of the forwards and tokens per forward; per draft
    source: drafts accepted / drafted."""
    kinds = ("plain", "heads", "context", "context+heads")
    header = ["configuration", *(f"{k} steps: share, tok/fwd" for k in kinds),
              "context drafts accepted / drafted", "head drafts accepted / drafted"]
    out = [_row(header), _row(["---"] * len(header))]
    for c in doc["configs"]:
        s = doc["summary"][c]
        fwd = s.get("forwards_by_source")
        if not fwd or not BenchConfig(**doc["config_specs"][c]).speculative:
            continue
        total = sum(fwd.values()) or 1
        cells: list[Any] = [c]
        for kind in kinds:
            n = fwd.get(kind, 0)
            cells.append(f"{n / total:.0%}, {s['tokens_per_forward_by_source'].get(kind, 0):.2f}" if n else "-")
        for src in ("context", "heads"):
            d = s["drafted_by_source"].get(src, 0)
            a = s["accepted_by_source"].get(src, 0)
            cells.append(f"{a} / {d} ({a / d:.0%})" if d else "-")
        out.append(_row(cells))
    return "\n".join(out)


def synthetic_markdown(doc: dict[str, Any]) -> str:
    out = []
    sizes = [str(b) for b in range(1, doc["max_batch"] + 1)]
    header = ["quantization, buffers", "1 row (ms)", *[f"{b} rows" for b in sizes[1:]], "head", "trunk capture (ms)",
              "projected @3.50 tok/fwd (medians)", "projected (fastest runs)"]
    out += [_row(header), _row(["---"] * len(header))]
    for m in doc["measurements"]:
        label = f"{m['quantization']}, {MODE_LABELS.get(m['mode'], m['mode'])}"
        if m.get("crashed"):
            out.append(_row([label, f"crashed: {m['error']}"] + [""] * (len(header) - 2)))
            continue
        rel = [f"{m['verify_rel'][b]:.2f}x" for b in sizes[1:]]
        pj, pjm = m["projection"], m["projection_min"]
        out.append(_row([
            label, f"{1e3 * m['verify_s']['1']:.0f}", *rel, f"{m['head_rel']:.1%}",
            f"{1e3 * m['capture_overhead_s']:.1f}",
            f"**{pj['at_n']['speedup']:.2f}x** ({pj['at_n']['drafts']} drafts); best {pj['best']['speedup']:.2f}x "
            f"({pj['best']['drafts']})",
            f"{pjm['at_n']['speedup']:.2f}x; best {pjm['best']['speedup']:.2f}x ({pjm['best']['drafts']})",
        ]))
    return "\n".join(out)


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, metavar="RESULTS.json", help="mtpcode bench --json files")
    for path in ap.parse_args(argv).results:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise NoInputError(f"cannot read {path}: {exc.strerror}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not a JSON document ({exc})") from None
        print(f"<!-- {path} -->")
        print(synthetic_markdown(doc) if doc.get("kind") == "synthetic" else bench_markdown(doc))
        print()
    return 0


if __name__ == "__main__":
    run_script(main, PROG)
