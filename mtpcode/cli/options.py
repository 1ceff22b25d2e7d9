"""Click options shared by the commands that run a model (complete, repl, serve)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

F = TypeVar("F", bound=Callable[..., object])


def _apply(f: F, *options: Callable[[F], F]) -> F:
    for option in reversed(options):  # so --help lists them in the order written
        f = option(f)
    return f


def model_option(f: F) -> F:
    return click.option("-m", "--model", help="Bundle directory or registered name (default: the configured model).")(f)


def heads_option(f: F) -> F:
    """--heads: how many draft heads a completion uses."""
    return click.option(
        "--heads", type=int, help="Draft heads to use (default: all the model has; 0 = no speculation)."
    )(f)


def sampling_options(f: F) -> F:
    """-t, --top-k, --top-p, --min-p, --seed."""
    return _apply(
        f,
        click.option("-t", "--temperature", type=float, help="0 = greedy (default); > 0 samples."),
        click.option("--top-k", type=int, help="Sample from the k most likely tokens (0 = off)."),
        click.option("--top-p", type=float, help="Nucleus sampling threshold (1 = off)."),
        click.option("--min-p", type=float, help="Drop tokens below min-p times the top probability (0 = off)."),
        click.option("--seed", type=int, help="Random seed for sampling (reported in the stats)."),
    )


def runtime_options(f: F) -> F:
    """--threads, --threads-batch, --gpu-layers, --ctx."""
    return _apply(
        f,
        click.option("--threads", type=int,
                     help="CPU threads for one-token steps (default: every core, 1 for models under 50M "
                          "parameters)."),
        click.option("--threads-batch", type=int,
                     help="CPU threads for the prompt and for verifying drafts (default: as --threads)."),
        click.option("--gpu-layers", type=int, help="Layers to offload to the GPU (-1 = all; default 0)."),
        click.option("--ctx", type=int, help="Context size in tokens [default: 4096]."),
    )


def repeat_stop_option(f: F) -> F:
    """--repeat-stop/--no-repeat-stop: whether a degenerate loop ends the completion."""
    return click.option(
        "--repeat-stop/--no-repeat-stop", "repeat_stop", default=None,
        help="Stop when the output loops (a line, or a group of lines, repeated many times in a row; "
             "a short unit repeated along a line) [default: on; setting repeat_stop].",
    )(f)
