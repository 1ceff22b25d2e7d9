"""GPU checks of mtpcode's runtime through its public API, for one device call.

    python -m mtpcode.bench.gpu STAGE --out FILE.json [--gpu-layers N] [--threads N] ...

scripts/device/device-check.sh runs every stage in one device call (docs/gpu.md).

Stages:

``capture``  the trunk rows the C (or Python) eval callback copies out of a
             main context with ``--gpu-layers`` layers offloaded, against the same
             prompt on the CPU: the capture reads device tensors when they match.
``engine``   the built-in model (or ``--model``) through ``mtpcode.runtime.Engine``
             on the GPU: plain greedy decoding, every head drafting (adaptive off),
             the product default, and plain again (an A/A control), on the bench's
             default prompts; tokens per second (medians), tokens per forward, and
             whether every configuration's output equals plain decoding on the GPU
             and plain decoding on the CPU alone (a child process that sees no GPU),
             token for token.
``costs``    the cost model: wall time of main forwards of 1..8 rows after a 64-token
             prefix, and of one head forward (mtpcode.bench.measure.measure_costs,
             flash attention on), with the weights offloaded
             (``--gpu-layers -1``) or on ``--threads`` CPU cores (``--gpu-layers 0``),
             for the built-in model and a synthetic shape (``--shape``, default the 7B;
             ``--quant``, default Q4_K_M and Q8_0). The shape
             is measured through two shallow models of its width (2 and 6 blocks) and
             scaled to its full depth (mtpcode.bench.synthetic.scale_depth), and the
             speedup at the paper's acceptance is projected from the scaled costs
             (mtpcode.bench.synthetic.project).
``plain``    plain greedy outputs of ``--ids`` on the CPU (the engine stage runs it in a
             child process that sees no GPU).

Results go to the JSON file; a short table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from mtpcode.bench.measure import common_prefix, measure_costs, median
from mtpcode.bench.run import default_prompts
from mtpcode.bench.synthetic import build_bundle, project, scale_depth, shape_params
from mtpcode.bundle import open_bundle
from mtpcode.errors import MtpError, UsageError, run_script
from mtpcode.generation import Done, GenerationOptions, Piece, Stats
from mtpcode.llama import Context, Model, TrunkCapture, native_capture_available
from mtpcode.models import builtin_model_path
from mtpcode.runtime import Engine

PROG = "python -m mtpcode.bench.gpu"


def _backend() -> dict[str, Any]:
    return {"llama_cpp": llama_cpp.__version__, "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
            "native_capture": native_capture_available(),
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


# ---------------------------------------------------------------------------
# capture


def check_capture(model_dir: Path, gpu_layers: int, threads: int) -> dict[str, Any]:
    """Trunk rows captured with the weights offloaded vs on the CPU, same prompt."""
    bundle = open_bundle(model_dir)
    text = "import os\nimport sys\n\n\ndef walk_py(path):\n    for root, dirs, files in os.walk(path):\n"
    rows = {}
    for layers in (gpu_layers, 0):
        with Model(bundle.main_path, n_gpu_layers=layers) as model:
            ids = model.tokenize(text)
            trunk = np.zeros((64, model.n_embd), dtype=np.float32)
            cap = TrunkCapture(bundle.manifest.trunk_tensor, trunk)
            with Context(model, n_ctx=64, n_batch=64, n_threads=threads, capture=cap, flash_attn=True) as ctx:
                ctx.batch.token_ids[:len(ids)] = ids
                ctx.decode(len(ids), 0, last_logits_only=True)
                if cap.error:
                    raise MtpError(f"capture error with {layers} GPU layers: {cap.error}")
                rows[layers] = trunk[:len(ids)].copy()
                native = cap.native
    a, b = rows[gpu_layers], rows[0]
    scale = float(np.abs(b).max())
    diff = float(np.abs(a - b).max())
    return {"prompt_tokens": int(a.shape[0]), "native_capture": native, "gpu_layers": gpu_layers,
            "max_abs_diff": diff, "max_abs_value": scale, "max_rel_diff": diff / scale if scale else None,
            "captured_nonzero_rows": int((np.abs(a).sum(1) > 0).sum()),
            "ok": bool(diff <= 1e-2 * scale and (np.abs(a).sum(1) > 0).all())}


# ---------------------------------------------------------------------------
# engine


def _run(engine: Engine, ids: list[int], max_tokens: int, **opts: Any) -> tuple[list[int], Stats]:
    """Decoding of ``ids`` with GenerationOptions ``opts``, from an empty cache: the tokens and the Stats."""
    # an empty cache for every run (a 1-token prompt shares at most BOS with the next)
    for _ in engine.generate(ids[:1], GenerationOptions(max_tokens=0, heads=0, context_draft=False)):
        pass
    tokens: list[int] = []
    stats = None
    for ev in engine.generate(ids, GenerationOptions(max_tokens=max_tokens, **opts)):
        if isinstance(ev, Piece):
            tokens.extend(ev.token_ids)
        elif isinstance(ev, Done):
            stats = ev.stats
    if stats is None:
        raise MtpError("a generation ended without its Done event")
    return tokens, stats


CONFIGS: dict[str, dict[str, Any]] = {
    "plain": dict(heads=0, context_draft=False),
    "all heads (adaptive off)": dict(heads=None, adaptive=False, context_draft=False),
    "default (adaptive, context)": dict(heads=None, adaptive=True),
    "plain again (A/A)": dict(heads=0, context_draft=False),
}


def check_engine(model_dir: Path, gpu_layers: int, threads: int, n_prompts: int, max_tokens: int,
                 repeat: int, flash_attn: bool = True) -> dict[str, Any]:
    """Speed and greedy identity of the engine with ``gpu_layers`` offloaded; CPU plain output for comparison."""
    prompts = default_prompts(n_prompts)
    out: dict[str, Any] = {"model": str(model_dir), "gpu_layers": gpu_layers, "prompts": [p.name for p in prompts],
                           "max_tokens": max_tokens, "repeat": repeat, "flash_attn": flash_attn}
    t0 = time.perf_counter()
    with Engine(model_dir, n_ctx=2048, n_threads=threads, n_gpu_layers=gpu_layers,
                flash_attn=flash_attn) as engine:
        out["load_s"] = round(time.perf_counter() - t0, 3)
        out["n_threads"] = engine.n_threads
        ids = [engine.tokenize(p.text) for p in prompts]
        results: dict[str, dict[str, list]] = {c: {"tps": [], "tpf": [], "tokens": []} for c in CONFIGS}
        for r in range(repeat):
            for name, opts in CONFIGS.items():
                for prompt_ids in ids:
                    tokens, st = _run(engine, prompt_ids, max_tokens, **opts)
                    if r == 0:
                        results[name]["tokens"].append(tokens)
                    results[name]["tps"].append(st.generated_tokens / st.decode_s if st.decode_s else 0.0)
                    results[name]["tpf"].append(st.tokens_per_forward)
    cpu_plain, out["cpu_reference"] = cpu_plain_tokens(model_dir, ids, threads, max_tokens)
    plain = results["plain"]["tokens"]
    plain_tps = np.array(results["plain"]["tps"])
    table = {}
    for name, res in results.items():
        ratios = np.array(res["tps"]) / np.where(plain_tps > 0, plain_tps, np.nan)
        table[name] = {
            "tokens_per_s_median": round(median(res["tps"]), 1),
            "speedup_median_of_paired_ratios": round(float(np.nanmedian(ratios)), 3),
            "tokens_per_forward_median": round(median(res["tpf"]), 3),
            "identical_to_plain_gpu": sum(a == b for a, b in zip(res["tokens"], plain)),
            "identical_to_plain_cpu": sum(a == b for a, b in zip(res["tokens"], cpu_plain)),
            "first_divergence_vs_plain_gpu": [None if a == b else common_prefix(a, b)
                                              for a, b in zip(res["tokens"], plain)],
        }
    out["configs"] = table
    out["prompts_n"] = len(prompts)
    return out


def cpu_plain_tokens(model_dir: Path, ids: list[list[int]], threads: int,
                     max_tokens: int) -> tuple[list[list[int]], str]:
    """Plain greedy outputs on the CPU alone, in a child process that sees no GPU, and how they were made.

    In this process a CUDA build would still send large host-weight matrix products (a
    prompt's prefill) to the GPU; with ``CUDA_VISIBLE_DEVICES`` empty it cannot. Should
    the child fail, the outputs come from this process, and the label says so.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "ids.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(ids))
        cmd = [sys.executable, "-m", "mtpcode.bench.gpu", "plain", "--model", str(model_dir), "--ids", str(src),
               "--out", str(dst), "--threads", str(threads), "--max-tokens", str(max_tokens), "--gpu-layers", "0"]
        proc = subprocess.run(cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": "",
                                                "GGML_OP_OFFLOAD_MIN_BATCH": "1000000"}, capture_output=True, text=True)
        if proc.returncode == 0:
            return json.loads(dst.read_text())["outputs"], "child process, no GPU visible"
        print(f"CPU reference without a visible GPU failed ({proc.stderr.strip()[-300:]}); in-process instead")
    return plain_tokens(model_dir, ids, threads, max_tokens), "in-process, GPU visible (prefill may use it)"


def plain_tokens(model_dir: Path, ids: list[list[int]], threads: int, max_tokens: int) -> list[list[int]]:
    """Plain greedy outputs of the engine with no layer offloaded."""
    with Engine(model_dir, n_ctx=2048, n_threads=threads, n_gpu_layers=0, flash_attn=True) as cpu:
        return [_run(cpu, prompt_ids, max_tokens, **CONFIGS["plain"])[0] for prompt_ids in ids]


# ---------------------------------------------------------------------------
# costs


def time_forwards(bundle_dir: Path, gpu_layers: int, threads: int, flash_attn: bool = True) -> dict[str, Any]:
    """Main forwards of 1..8 rows after a 64-token prefix (trunk captured, as the runtime runs them) and
    one head forward, with ``gpu_layers`` offloaded and flash attention on (the GPU setting) or off."""
    return measure_costs(bundle_dir, mode="off", max_batch=8, repeat=5, threads=threads, prefix=64,
                         flash_attn=flash_attn, n_gpu_layers=gpu_layers)


def costs_shape(shape: str, quant: str, gpu_layers: int, threads: int, cache: Path,
                depths: tuple[int, int] = (1, 5), flash_attn: bool = True) -> dict[str, Any]:
    """A synthetic shape's cost table from two shallow models (``depths`` trunk blocks), scaled to full depth."""
    full_blocks = shape_params(shape).n_trunk + 1
    measured, shallow = {}, {}
    for depth in depths:
        path = build_bundle(shape, quant, cache, n_heads=1, trunk_blocks=depth)
        r = time_forwards(path, gpu_layers, threads, flash_attn)
        measured[str(depth + 1)] = r
        shallow[depth + 1] = {(int(b), threads): float(s) for b, s in r["verify_s"].items()}
    scaled = scale_depth(shallow, full_blocks)
    one = scaled[(1, threads)]
    head_s = median([measured[k]["head_s"] for k in measured])
    costs = {"verify_s": {str(b): round(s, 6) for (b, _), s in sorted(scaled.items())},
             "verify_rel": {str(b): round(s / one, 4) for (b, _), s in sorted(scaled.items())},
             "head_s": round(head_s, 6), "head_rel": round(head_s / one, 4)}
    return {"shape": shape, "quantization": quant, "full_depth_blocks": full_blocks,
            "measured_depth_blocks": [d + 1 for d in depths], "measured": measured, "scaled": costs,
            "projection": project(costs),
            "note": "per-block cost = slope between the two shallow models; the rest (output matrix, embedding "
                    "lookup, fixed per-forward work) = intercept; T(full) = T(d1) + (full - d1) x slope. "
                    "The head (one block + output) is measured directly and does not scale."}


def check_costs(gpu_layers: int, threads: int, shape: str, quants: list[str], cache: Path,
                model_dir: Path, flash_attn: bool = True) -> dict[str, Any]:
    """The cost table of the built-in model (or ``model_dir``) and of ``shape`` in each of ``quants``."""
    out: dict[str, Any] = {"gpu_layers": gpu_layers, "threads": threads, "shape": shape, "flash_attn": flash_attn}
    builtin = time_forwards(model_dir, gpu_layers, threads, flash_attn)
    builtin["projection"] = project(builtin)
    out["builtin"] = builtin
    out["synthetic"] = {q: costs_shape(shape, q, gpu_layers, threads, cache, flash_attn=flash_attn) for q in quants}
    return out


def _cost_line(name: str, c: dict[str, Any]) -> str:
    rel = " ".join(f"{b}:{v:.2f}" for b, v in c["verify_rel"].items())
    pj = c.get("projection", {}).get("at_n", {})
    return (f"{name}: 1 row {1e3 * float(c['verify_s']['1']):.2f} ms, rows/1 row {rel}, head {c['head_rel']:.3f}"
            + (f", projected speedup {pj['speedup']:.2f}x at {pj['drafts']} drafts" if pj else ""))


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("stage", choices=("capture", "engine", "costs", "plain"))
    ap.add_argument("--ids", type=Path, help="plain: JSON list of prompts' token ids")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gpu-layers", type=int, default=-1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", type=Path, help="bundle directory (default: the built-in model)")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quant", default="Q4_K_M,Q8_0")
    ap.add_argument("--shape", default="7b", help="synthetic shape of the cost table [default: 7b]")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/mtpcode-synthetic"))
    ap.add_argument("--flash-attn", choices=("on", "off"), default="on",
                    help="flash attention in the engine and costs stages [default: on, the GPU setting]")
    args = ap.parse_args(argv)
    model = args.model or builtin_model_path()
    if model is None:
        raise UsageError("this install has no built-in model: pass --model")
    t0 = time.perf_counter()
    if args.stage == "capture":
        result = check_capture(model, args.gpu_layers, args.threads)
        print(f"capture: {'C' if result['native_capture'] else 'Python'} callback, max |diff| GPU vs CPU "
              f"{result['max_abs_diff']:.3g} of {result['max_abs_value']:.3g}: {'ok' if result['ok'] else 'DIFFERS'}")
    elif args.stage == "plain":
        result = {"outputs": plain_tokens(model, json.loads(args.ids.read_text()), args.threads, args.max_tokens)}
    elif args.stage == "engine":
        result = check_engine(model, args.gpu_layers, args.threads, args.n_prompts, args.max_tokens, args.repeat,
                              flash_attn=args.flash_attn == "on")
        for name, r in result["configs"].items():
            print(f"{name:28s} {r['tokens_per_s_median']:8.1f} tok/s  x{r['speedup_median_of_paired_ratios']:.2f}  "
                  f"{r['tokens_per_forward_median']:.2f} tok/fwd  identical to plain: GPU "
                  f"{r['identical_to_plain_gpu']}/{result['prompts_n']}, CPU {r['identical_to_plain_cpu']}/"
                  f"{result['prompts_n']}")
    else:
        result = check_costs(args.gpu_layers, args.threads, args.shape, [q for q in args.quant.split(",") if q],
                             args.cache, model, flash_attn=args.flash_attn == "on")
        print(_cost_line("built-in", result["builtin"]))
        for q, r in result["synthetic"].items():
            print(_cost_line(f"{args.shape} {q} (scaled to {r['full_depth_blocks']} blocks)",
                             {**r["scaled"], "projection": r["projection"]}))
    result["stage"] = args.stage
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["backend"] = _backend()
    result["command"] = f"{PROG} " + " ".join(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_script(main, PROG)
