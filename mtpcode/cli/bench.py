"""``mtpcode bench``: the command over :mod:`mtpcode.bench.run` (speculative vs
plain decoding of one bundle) and :mod:`mtpcode.bench.synthetic` (the cost
model at real model sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mtpcode.bench.run import (
    ANCHOR,
    MODE_LABELS,
    check_plot_path,
    divergence_margins,
    format_mismatches,
    format_synthetic,
    format_table,
    prompt_set,
    run_bench,
    run_synthetic,
    unexplained_mismatches,
    write_plot,
)
from mtpcode.bench.synthetic import QUANTS, SHAPES, format_projection, run_projection
from mtpcode.config import load_settings
from mtpcode.errors import MtpError, UsageError
from mtpcode.files import atomic_write_text
from mtpcode.models import resolve_model


def _parse_heads(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        heads = [int(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"--heads {value!r}: give a comma-separated list of head counts, e.g. 1,2,3") from None
    if not heads or any(h < 0 for h in heads):
        raise UsageError(f"--heads {value!r}: head counts must be >= 0")
    return heads


@click.command("bench")
@click.option("-m", "--model",
              help="Bundle directory or registered name (default: the configured model, else the built-in one).")
@click.option("--prompts", "prompts_path", metavar="SET|FILE|DIR", default="general", show_default=True,
              help="Prompts: 'general' (held-out Python standard-library snippets: write a function body), "
                   "'editing' (third-party code installed here, where the completion repeats text of the file "
                   "or of the text after the cursor), a directory (one file per prompt), a .jsonl file "
                   "(objects with prompt, optional name and suffix), or one text file.")
@click.option("-n", "--max-tokens", type=int, default=128, show_default=True, help="Tokens to generate per run.")
@click.option("--heads", "heads_list", metavar="LIST",
              help="Head counts to compare with plain decoding, e.g. 1,2,3 [default: all].")
@click.option("--repeat", type=int, default=3, show_default=True,
              help="Repetitions of every configuration (medians are reported).")
@click.option("--n-prompts", type=int, default=8, show_default=True, help="Number of prompts of a built-in set.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the results as JSON here ('-' = stdout).")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path), help="Write a plot (SVG) here.")
@click.option("--threads", type=int, help="CPU threads for one-token steps [default: the runtime's choice].")
@click.option("--threads-batch", type=int,
              help="CPU threads for prompts and verification [default: the runtime's choice].")
@click.option("--gpu-layers", type=int,
              help="Layers to offload to the GPU (-1 = all) for the engine, the anchor and the costs "
                   "[default: the gpu_layers setting].")
@click.option("--ctx", type=int, default=2048, show_default=True, help="Context size in tokens.")
@click.option("--no-adaptive", is_flag=True, help="Always draft with the requested heads (no adaptive policy).")
@click.option("--no-anchor", is_flag=True, help="Skip the plain llama-cpp-python Llama run.")
@click.option("--no-context-draft", is_flag=True,
              help="Skip the configurations that draft from the context (context only, heads + context).")
@click.option("--no-costs", is_flag=True, help="Skip measuring the bundle's forward costs after the runs.")
@click.option("--synthetic", metavar="SHAPE",
              help="Cost model at a real size instead: random-weight bundle of SHAPE (7b, 1b, tiny).")
@click.option("--quant", "quants", default="Q4_0,Q4_K_M", show_default=True,
              help="Synthetic: quantization types to measure.")
@click.option("--max-batch", type=int, default=8, show_default=True, help="Synthetic: largest verify batch measured.")
@click.option("--no-repack", is_flag=True, help="Synthetic: skip the CPU_REPACK comparison.")
@click.option("--buffers", default="off,on,repack", show_default=True,
              help="Synthetic: weight buffer modes to measure (off, on, repack), each in its own process.")
@click.option("--tokens-per-forward", type=float,
              help="Synthetic: acceptance to project with [default: the paper's 3.50].")
@click.option("--project", is_flag=True,
              help="Synthetic: measure 1..N-thread forwards, fit a compute-vs-bandwidth model and PROJECT the "
                   "speedup on 8- and 16-core desktops.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def bench(model, prompts_path, max_tokens, heads_list, repeat, n_prompts, json_out, plot_out, threads, threads_batch,
          gpu_layers, ctx, no_adaptive, no_anchor, no_context_draft, no_costs, synthetic, quants, max_batch,
          no_repack, buffers, tokens_per_forward, quiet, project=False):
    """Benchmark speculative vs plain decoding (or, with --synthetic, project a real-size model's speedup)."""
    check_plot_path(plot_out)
    if repeat < 1:
        raise UsageError("--repeat must be at least 1")
    for flag, value in (("--threads", threads), ("--threads-batch", threads_batch)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1")

    def say(msg: str) -> None:
        if not quiet:
            click.echo(f"bench: {msg}", err=True)

    if synthetic:
        if synthetic not in SHAPES:
            raise UsageError(f"--synthetic {synthetic!r}: choose one of {', '.join(SHAPES)}")
        qs = [q.strip().upper() for q in quants.split(",") if q.strip()]
        bad = [q for q in qs if q not in QUANTS]
        if bad or not qs:
            raise UsageError(f"--quant {quants!r}: choose from {', '.join(QUANTS)}")
        modes = [b.strip() for b in buffers.split(",") if b.strip()]
        if not modes or any(b not in MODE_LABELS for b in modes):
            raise UsageError(f"--buffers {buffers!r}: choose from {', '.join(MODE_LABELS)}")
        if project:
            if plot_out is not None:
                raise UsageError("--plot is not drawn for --project; use --json")
            doc = run_projection(synthetic, qs, max_batch=max_batch, threads=range(1, (threads or 2) + 1),
                                 repeat=repeat, mode="on" if "on" in modes else modes[0],
                                 tokens_per_forward=tokens_per_forward, progress=say)
            report = format_projection(doc)
        else:
            doc = run_synthetic(synthetic, qs, max_batch=max_batch, repeat=repeat, threads=threads or 2,
                                repack=not no_repack, modes=modes, tokens_per_forward=tokens_per_forward,
                                progress=say)
            report = format_synthetic(doc)
    else:
        if max_tokens < 1:
            raise UsageError("--max-tokens must be at least 1")
        settings = load_settings()
        path = resolve_model(model, settings)
        prompts = prompt_set(prompts_path, n_prompts)
        layers = settings.gpu_layers if gpu_layers is None else gpu_layers
        doc = run_bench(path, prompts, heads=_parse_heads(heads_list), max_tokens=max_tokens, repeat=repeat,
                        threads=threads or settings.threads,
                        threads_batch=threads_batch or settings.threads_batch, n_ctx=ctx, adaptive=not no_adaptive,
                        anchor=not no_anchor, context=not no_context_draft, extra_bufts=settings.extra_bufts,
                        flash_attn=settings.use_flash_attn(layers), costs=not no_costs, gpu_layers=layers,
                        progress=say)
        report = format_table(doc)
    if doc.get("mismatches"):
        say("recomputing the logits where outputs diverge")
        divergence_margins(doc, threads)
    if json_out is not None and str(json_out) == "-":
        click.echo(json.dumps(doc, indent=1))
    else:
        click.echo(report)
        if json_out is not None:
            atomic_write_text(json_out, json.dumps(doc, indent=1) + "\n")
    if plot_out is not None:
        write_plot(doc, plot_out)
    if doc.get("mismatches"):
        # Parting at a near-tie is kernel rounding (quantized weights round a batched verify and a
        # one-row decode differently); anything else means speculative decoding is not exact.
        wrong = unexplained_mismatches(doc, skip_config=ANCHOR.key)
        click.secho(format_mismatches(doc), err=True, fg="red" if wrong else "yellow", bold=bool(wrong))
        if wrong:
            raise MtpError(f"greedy output differs from plain decoding in {len(wrong)} run(s), not at a near-tie: "
                           "speculative decoding is not exact here (see MISMATCH lines above)")
        click.echo("bench: note: only llama-cpp-python's own decoding of main.gguf differs from mtpcode's plain "
                   "decoding (at a near-tie, see above); speculative output matched plain in every run", err=True)
