"""``mtpcode convert``: a Meta multi-token-prediction checkpoint -> a GGUF bundle."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from mtpcode import models
from mtpcode.config import load_settings
from mtpcode.errors import UsageError

# ---------------------------------------------------------------------------
# which quantization to verify with on a CPU


@dataclass(frozen=True)
class QuantAdvice:
    """How a quantization type verifies on CPU, from the 7B-shape cost measurements."""

    quant: str
    four_rows_rel: tuple[float, float]  # time of a 4-row forward / a 1-row forward (range over runs)
    verdict: str  # "best", "good" or "slow"


# The 7B shape at 2 threads on a 2-vCPU AMD EPYC, four weight-buffer modes (docs/results/bench-synthetic-7b.json;
# docs/PERFORMANCE.md, "Guidance: which quantization"). In tokens per second Q4_0 is the fastest of the three
# with drafting (half Q8_0's bytes), Q8_0 gains the most from it.
QUANT_ADVICE: dict[str, QuantAdvice] = {
    "Q8_0": QuantAdvice("Q8_0", (1.6, 1.8), "best"),
    "Q4_0": QuantAdvice("Q4_0", (2.2, 2.5), "good"),
    "Q4_K_M": QuantAdvice("Q4_K_M", (2.6, 3.3), "slow"),
}


def quant_note(quant: str) -> str | None:
    """A one-line note when ``quant`` verifies badly on CPU (None when it does not, or is unmeasured)."""
    advice = QUANT_ADVICE.get(quant.upper())
    if advice is None or advice.verdict != "slow":
        return None
    lo, hi = advice.four_rows_rel
    q4, q8 = QUANT_ADVICE["Q4_0"].four_rows_rel, QUANT_ADVICE["Q8_0"].four_rows_rel
    return (f"note: {advice.quant} verifies drafts slowly on CPU (4 tokens cost {lo:g}-{hi:g}x one; "
            f"Q4_0 {q4[0]:g}-{q4[1]:g}x, Q8_0 {q8[0]:g}-{q8[1]:g}x): for speculative decoding on a CPU "
            "prefer --quant Q4_0 (fastest) or --quant Q8_0 (largest speedup, twice the memory)")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


class _Progress:
    """Progress on stderr: an updating line on a terminal, one line per stage otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.stage = ""
        self.last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        new_stage = stage != self.stage
        if not new_stage and now - self.last < 0.1 and done < total:
            return
        self.last = now
        if self.tty:
            pct = f" {100 * done / total:5.1f}%" if total else ""
            click.echo(f"\r\x1b[K{stage}{pct}", nl=False, err=True)
        elif new_stage:
            click.echo(stage, err=True)
        self.stage = stage

    def finish(self) -> None:
        if self.tty and self.stage:
            click.echo("\r\x1b[K", nl=False, err=True)


@click.command()
@click.argument("ckpt_dir", type=click.Path(path_type=Path))
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="tokenizer.model (default: beside the checkpoint or in its parent).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Bundle directory (default: the models directory, registered by name).")
@click.option("--name", help="Name to register the bundle under (default: checkpoint directory name + quant).")
@click.option("--quant", default="Q8_0", show_default=True,
              help="F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, IQ4_XS, ... "
                   "(on a CPU, Q8_0 verifies drafts fastest, Q4_0 decodes fastest, Q4_K_M verifies slowest).")
@click.option("--verify", is_flag=True,
              help="Compare every head with a PyTorch reference forward; fail if out of tolerance.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for quantization and verification.")
@click.option("--no-register", is_flag=True, help="Do not add the bundle to the model registry.")
def convert(ckpt_dir: Path, tokenizer: Path | None, out_dir: Path | None, name: str | None, quant: str,
            verify: bool, force: bool, threads: int | None, no_register: bool) -> None:
    """Convert a Meta multi-token-prediction checkpoint into a bundle.

    CKPT_DIR holds consolidated.pth (or consolidated.00.pth, .01, ... shards) and
    params.json; tokenizer.model sits in it or in its parent. The bundle is
    main.gguf (runs in any llama.cpp), one head-K.gguf per extra head, and mtp.json.
    """
    try:
        # (torch and sentencepiece: only for a conversion, and only with the convert extra)
        from converters.convert import convert_checkpoint
        from converters.quantize import normalize_quant
    except ImportError as exc:
        raise UsageError(
            f"conversion needs PyTorch and sentencepiece ({exc.name} is missing): "
            "pip install 'mtpcode[convert]'"
        ) from None
    quant = normalize_quant(quant)
    # before the work starts, so that a user can still pick another type; only for a checkpoint that is
    # there (a missing one is one error line, not a note and an error)
    note = quant_note(quant) if (Path(ckpt_dir).expanduser() / "params.json").is_file() else None
    if note:
        click.echo(note, err=True)
    settings = load_settings()
    register = not no_register
    if name is not None:
        models.validate_name(name)
    if out_dir is None:
        name = name or models.default_model_name_for(ckpt_dir, quant)
        out_dir = models.models_dir(settings) / name
    elif register and name is None:
        name = out_dir.expanduser().resolve().name
        try:
            models.validate_name(name)
        except UsageError:
            register = False

    progress = _Progress()
    try:
        result = convert_checkpoint(ckpt_dir, out_dir, quant=quant, tokenizer=tokenizer, force=force,
                                    threads=threads, verify=verify, progress=progress)
    finally:
        progress.finish()

    if register and name:
        models.register_model(name, result.out_dir, settings=settings, force=force)

    echo = lambda s="": click.echo(s, err=True)  # noqa: E731
    m = result.manifest
    echo(f"converted {ckpt_dir} -> {result.out_dir} ({result.quant}, {result.seconds:.1f} s)")
    echo(f"  n_future_tokens {m.n_future_tokens}: trunk {m.n_trunk} blocks + {m.n_future_tokens} head blocks, "
         f"dim {m.n_embd}, vocab {m.n_vocab}")
    for file, size in result.files.items():
        params = result.parameters.get(file.removesuffix(".gguf"))
        echo(f"  {file:<12} {_human(size):>10}" + (f"  {_count(params)} parameters" if params else ""))
    echo(f"  total        {_human(sum(result.files.values())):>10}")
    if result.verify_report is not None:
        for line in result.verify_report.lines():
            echo("  " + line)
    if register and name:
        echo(f"registered as {name!r}: mtpcode complete --model {name}")
    click.echo(str(result.out_dir))
