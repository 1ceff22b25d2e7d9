"""``mtpcode repl``: an interactive completion REPL (prompt-toolkit + pygments).

The UI object lives in :mod:`mtpcode.repl.ui`, the session's text and prompts
in :mod:`mtpcode.repl.session`, the ``/commands`` in :mod:`mtpcode.repl.commands`;
the editing rules and key bindings in :mod:`mtpcode.repl.edit`; model-backed
ghost text in :mod:`mtpcode.repl.suggest`. This module is the command: it checks
for a terminal, resolves settings and the model, and runs the session.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mtpcode.cli.frontend import isatty
from mtpcode.cli.options import heads_option, model_option, repeat_stop_option, runtime_options, sampling_options
from mtpcode.config import load_settings
from mtpcode.errors import UsageError
from mtpcode.models import is_builtin, resolve_model

NOT_A_TERMINAL = (
    "mtpcode repl needs a terminal ({which} is not a tty); "
    "to complete piped or scripted input use `mtpcode complete`"
)


@click.command("repl")
@click.argument("file", required=False)
@model_option
@click.option("-l", "--language", help="Highlighting language, a pygments name [default: python, or FILE's].")
@click.option("-n", "--max-tokens", type=int, help="Most tokens per completion [default: 256].")
@sampling_options
@heads_option
@repeat_stop_option
@runtime_options
@click.option(
    "--stop",
    default="block",
    show_default=True,
    help="Where a completion ends: block (the block being written), none (max tokens), or N lines.",
)
@click.option("--suggest/--no-suggest", default=True, show_default=True, help="Live ghost-text suggestions.")
@click.option("--suggest-tokens", type=int, default=16, show_default=True, help="Most tokens per suggestion.")
@click.option("--style", default="default", show_default=True, help="Pygments colour style (monokai, native, ...).")
def repl(
    file: str | None,
    model: str | None,
    language: str | None,
    max_tokens: int | None,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    seed: int | None,
    heads: int | None,
    repeat_stop: bool | None,
    threads: int | None,
    threads_batch: int | None,
    gpu_layers: int | None,
    ctx: int | None,
    stop: str,
    suggest: bool,
    suggest_tokens: int,
    style: str,
) -> None:
    """Interactive code completion: type code, the model continues it.

    The session keeps a growing buffer, like a scratch file: each input joins
    it, the model's completion streams after it (highlighted, then one stats
    line) and joins it too. Grey ghost text suggests the rest of the line
    while you type (→ or Ctrl-E accepts it, Alt-F one word).

    Enter submits a complete input and opens a new line inside brackets, after
    ':' or in a block (an empty last line submits); Alt-Enter always submits;
    Ctrl-J always opens a new line. Commands: /help, /load, /save, /clear,
    /set, /model, /stats, /quit. FILE, if given, is loaded first.
    """
    for name, stream in (("stdin", sys.stdin), ("stdout", sys.stdout)):
        if not isatty(stream):
            raise UsageError(NOT_A_TERMINAL.format(which=name))
    run_repl(
        file=file, model=model, language=language, stop=stop, suggest=suggest, suggest_tokens=suggest_tokens,
        style=style, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        seed=seed, heads=heads, repeat_stop=repeat_stop, threads=threads, threads_batch=threads_batch,
        gpu_layers=gpu_layers, ctx=ctx,
    )


def _display_name(spec: str | None, path: Path) -> str:
    # A registered name as the user knows it; a directory by its last component.
    if spec is None or Path(spec).expanduser().exists():
        return path.name
    return spec


def run_repl(
    *,
    file: str | None = None,
    model: str | None = None,
    language: str | None = None,
    stop: str = "block",
    suggest: bool = True,
    suggest_tokens: int = 16,
    style: str = "default",
    input=None,
    output=None,
    **setting_flags,
) -> None:
    """Resolve settings and the model, then run one REPL session until /quit or Ctrl-D.

    ``setting_flags`` are :func:`mtpcode.config.load_settings` overrides
    (``max_tokens=``, ``threads=``, ...; None = not given). ``input`` and
    ``output`` are prompt-toolkit objects (default: the terminal).
    """
    # (prompt-toolkit and pygments: loaded when a REPL starts, not for every command)
    from mtpcode.repl.commands import cmd_load, set_value
    from mtpcode.repl.edit import lexer_by_name
    from mtpcode.repl.session import parse_stop
    from mtpcode.repl.ui import Repl, history_path

    try:
        stop_mode = parse_stop(stop)
    except ValueError:
        raise UsageError(f"--stop {stop!r}: expected block, none or a number of lines") from None
    if not 1 <= suggest_tokens <= 256:
        raise UsageError("--suggest-tokens must be from 1 to 256")
    if language is not None:
        lexer_by_name(language)  # fail before loading the model
    settings = load_settings(model=model, **setting_flags)
    path = resolve_model(model, settings)
    ui = Repl(
        settings,
        model_path=path,
        model_name=_display_name(model or settings.model, path),
        language=language,
        stop=stop_mode,
        suggest=suggest,
        suggest_tokens=suggest_tokens,
        style=style,
        history=history_path(settings),
        input=input,
        output=output,
    )
    if is_builtin(path) and model is None:
        ui.info("using the small built-in model (a demo, not a real code model); pick one with --model or /model")
    if file is not None:
        cmd_load(ui, file)
        if language is not None:
            set_value(ui, "language", language)
    ui.run()
